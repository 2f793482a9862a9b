//! The install image end to end: a realistic disk.raw (kiln's six
//! partitions, random ESP content, a fake squashfs and tree, a real ext4),
//! its install image, and the installer writing it to a larger disk, on a
//! good day and on bad ones.

use kiln_formats::gpt::{self, deterministic_guid, Gpt, Layout, PartSize};
use kiln_contract::install_image;
use kiln_init::node::install::write::{apply, InstallError, Progress, Report, Target};
use proptest::prelude::*;
use std::cell::Cell;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

const MIB: u64 = 1 << 20;

/// The tools these tests need, or None (the test is skipped, loudly; under
/// CI=true a missing one fails it).
fn tools() -> Option<(PathBuf, PathBuf, PathBuf)> {
    use kiln_testkit::checker;
    Some((
        checker("mkfs.ext4", "e2fsprogs")?,
        checker("sgdisk", "gdisk")?,
        checker("e2fsck", "e2fsprogs")?,
    ))
}

macro_rules! need_tools {
    () => {
        match tools() {
            Some(t) => t,
            None => return,
        }
    };
}

/// Deterministic bytes, never zero (xorshift).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut s = seed | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s as u8) | 1
        })
        .collect()
}

struct Fixture {
    dir: tempfile::TempDir,
    disk: PathBuf,
    root: PathBuf,
    verity: PathBuf,
    image: PathBuf,
    table: Gpt,
    summary: kiln::image::install::Summary,
}

impl Fixture {
    fn part(&self, name: &str) -> (u64, u64) {
        let p = self
            .table
            .partitions
            .iter()
            .find(|p| p.name == name)
            .unwrap();
        (p.offset_bytes(), p.size_bytes())
    }

    fn disk_bytes(&self) -> u64 {
        self.table.size_bytes
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A disk laid out the way `kiln::image::disk` lays one out, smaller, and its
/// install image.
fn source(mkfs: &Path) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let g = |what: &str| deterministic_guid("kiln/install-test", what);
    let mut layout = Layout::new(g("disk"));
    layout
        .add(
            "esp",
            gpt::types::ESP,
            g("esp"),
            PartSize::Bytes(8 * MIB),
            0,
        )
        .add(
            "root-a",
            gpt::types::ROOT_X86_64,
            g("root-a"),
            PartSize::Bytes(8 * MIB),
            0,
        )
        .add(
            "root-a-verity",
            gpt::types::ROOT_VERITY_X86_64,
            g("root-a-verity"),
            PartSize::Bytes(MIB),
            0,
        )
        .add(
            "root-b",
            gpt::types::ROOT_X86_64,
            g("root-b"),
            PartSize::Bytes(8 * MIB),
            0,
        )
        .add(
            "root-b-verity",
            gpt::types::ROOT_VERITY_X86_64,
            g("root-b-verity"),
            PartSize::Bytes(MIB),
            0,
        )
        .add(
            "data",
            gpt::types::LINUX_DATA,
            g("data"),
            PartSize::Bytes(32 * MIB),
            gpt::attributes::GROWFS,
        );
    let size = layout.min_disk_size();
    let table = layout.build(size).unwrap();
    let disk = dir.path().join("disk.raw");
    let mut f = File::options().read(true).write(true).create(true).truncate(true).open(&disk).unwrap();
    f.set_len(size).unwrap();
    table.write(&mut f).unwrap();
    let at = |name: &str| {
        table
            .partitions
            .iter()
            .find(|p| p.name == name)
            .unwrap()
            .offset_bytes()
    };

    // ESP: a filled first MiB and a few scattered blocks.
    f.write_all_at(&noise(MIB as usize, 1), at("esp")).unwrap();
    f.write_all_at(&noise(4096, 2), at("esp") + 3 * MIB)
        .unwrap();
    f.write_all_at(&noise(100, 3), at("esp") + 5 * MIB + 100)
        .unwrap();

    // A fake squashfs and tree.
    let root = dir.path().join("root.squashfs");
    let root_bytes = noise(5 * MIB as usize + 12 * 1024, 4);
    std::fs::write(&root, &root_bytes).unwrap();
    f.write_all_at(&root_bytes, at("root-a")).unwrap();
    let verity = dir.path().join("root.verity");
    let verity_bytes = noise(48 * 1024, 5);
    std::fs::write(&verity, &verity_bytes).unwrap();
    f.write_all_at(&verity_bytes, at("root-a-verity")).unwrap();

    // A real ext4, copied sparsely as disk.rs does.
    let ext4 = dir.path().join("data.ext4");
    File::create(&ext4).unwrap().set_len(32 * MIB).unwrap();
    let out = Command::new(mkfs)
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-L",
            "kiln-data",
            "-E",
            "lazy_itable_init=0,lazy_journal_init=0,nodiscard",
        ])
        .arg(&ext4)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "mkfs.ext4: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fs = std::fs::read(&ext4).unwrap();
    for (i, block) in fs.chunks(4096).enumerate() {
        if block.iter().any(|b| *b != 0) {
            f.write_all_at(block, at("data") + i as u64 * 4096).unwrap();
        }
    }
    f.sync_all().unwrap();
    drop(f);

    let image = dir.path().join("install.img");
    let part = |name: &str| {
        let p = table.partitions.iter().find(|p| p.name == name).unwrap();
        (p.offset_bytes(), p.size_bytes())
    };
    let summary = kiln::image::install::write(
        &disk,
        part("root-a"),
        &root,
        part("root-a-verity"),
        &verity,
        &image,
    )
    .unwrap();
    Fixture {
        dir,
        disk,
        root,
        verity,
        image,
        table,
        summary,
    }
}

fn sparse(path: &Path, len: u64, fill: Option<u8>) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .unwrap();
    f.set_len(len).unwrap();
    if let Some(b) = fill {
        let chunk = vec![b; MIB as usize];
        let mut at = 0;
        while at < len {
            let n = (len - at).min(MIB);
            f.write_all_at(&chunk[..n as usize], at).unwrap();
            at += n;
        }
    }
    f
}

/// A target that stops writing after `budget` bytes, keeping what fit of
/// the last write: a power cut. It also counts writes.
struct Cut {
    file: File,
    budget: Cell<u64>,
    writes: Cell<u64>,
    written: Cell<u64>,
}

impl Cut {
    fn new(file: File, budget: u64) -> Cut {
        Cut {
            file,
            budget: Cell::new(budget),
            writes: Cell::new(0),
            written: Cell::new(0),
        }
    }
}

impl Target for Cut {
    fn write_at_offset(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.writes.set(self.writes.get() + 1);
        let keep = (buf.len() as u64).min(self.budget.get()) as usize;
        self.budget.set(self.budget.get() - keep as u64);
        self.written.set(self.written.get() + keep as u64);
        self.file.write_all_at(&buf[..keep], offset)?;
        if keep < buf.len() {
            return Err(io::Error::other("power cut"));
        }
        Ok(())
    }

    fn read_at_offset(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn flush_to_disk(&self) -> io::Result<()> {
        self.file.sync_data()
    }
}

fn install<T: Target + ?Sized>(
    s: &Fixture,
    image: &Path,
    target: &T,
    target_bytes: u64,
) -> Result<Report, InstallError> {
    apply(
        &mut File::open(image).unwrap(),
        &mut File::open(&s.root).unwrap(),
        &mut File::open(&s.verity).unwrap(),
        target,
        target_bytes,
        |_| {},
    )
}

/// The first offset in `[from, to)` where the two files differ.
fn first_difference(a: &Path, b: &Path, from: u64, to: u64) -> Option<u64> {
    let (fa, fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut x, mut y) = (vec![0u8; MIB as usize], vec![0u8; MIB as usize]);
    let mut at = from;
    while at < to {
        let n = (to - at).min(MIB) as usize;
        fa.read_exact_at(&mut x[..n], at).unwrap();
        fb.read_exact_at(&mut y[..n], at).unwrap();
        if x[..n] != y[..n] {
            return Some(
                at + x[..n]
                    .iter()
                    .zip(&y[..n])
                    .position(|(p, q)| p != q)
                    .unwrap() as u64,
            );
        }
        at += n as u64;
    }
    None
}

fn copy_range(from: &Path, offset: u64, len: u64, to: &Path) {
    let mut src = File::open(from).unwrap();
    src.seek(SeekFrom::Start(offset)).unwrap();
    let mut dst = File::create(to).unwrap();
    io::copy(&mut src.take(len), &mut dst).unwrap();
}

fn sgdisk_clean(sgdisk: &Path, disk: &Path) {
    let out = Command::new(sgdisk).arg("-v").arg(disk).output().unwrap();
    let text = kiln_testkit::output_text(&out);
    assert!(
        out.status.success() && text.contains("No problems found"),
        "sgdisk -v {}:\n{text}",
        disk.display()
    );
}

fn e2fsck_clean(e2fsck: &Path, fs: &Path) {
    let out = Command::new(e2fsck).arg("-fn").arg(fs).output().unwrap();
    let text = kiln_testkit::output_text(&out);
    assert!(out.status.success(), "e2fsck -fn {}:\n{text}", fs.display());
}

/// Checks the disk's tables and its data filesystem, from a copy of
/// `target` cut to the source disk's size.
fn check_disk(s: &Fixture, target: &Path, sgdisk: &Path, e2fsck: &Path) {
    let copy = s.path("target-copy.raw");
    copy_range(target, 0, s.disk_bytes(), &copy);
    sgdisk_clean(sgdisk, &copy);
    let (off, len) = s.part("data");
    let fs = s.path("target-data.ext4");
    copy_range(target, off, len, &fs);
    e2fsck_clean(e2fsck, &fs);
    let back = Gpt::read(&mut File::open(target).unwrap()).unwrap();
    assert_eq!(back, s.table, "the target's GPT is the image's");
}

#[test]
fn install_image_describes_the_disk() {
    let (mkfs, sgdisk, _) = need_tools!();
    let s = source(&mkfs);
    sgdisk_clean(&sgdisk, &s.disk);
    let sum = &s.summary;
    assert_eq!(sum.disk_bytes, s.disk_bytes());
    assert_eq!(sum.root_bytes, 5 * MIB + 12 * 1024);
    assert_eq!(sum.verity_bytes, 48 * 1024);
    assert_eq!(sum.image_bytes, std::fs::metadata(&s.image).unwrap().len());
    // Only the tables, the ESP's few blocks and ext4's metadata are stored.
    assert!(
        sum.packed_bytes < MIB + 8192 + 4 * MIB + 64 * 1024 + 32 * 1024,
        "{sum:?}"
    );
    assert!(sum.packed_bytes > MIB, "{sum:?}");
    // Zeroed: the rest of ESP and data and the table areas, not the B slots.
    let (esp, data) = (s.part("esp").1, s.part("data").1);
    assert!(
        sum.zero_bytes < esp + data + 2 * MIB && sum.zero_bytes > esp + data - 8 * MIB,
        "{sum:?}"
    );

    let mut f = File::open(&s.image).unwrap();
    let h = install_image::Header::decode(&mut f).unwrap();
    assert_eq!(h.digest(), sum.header_sha256);
    assert_eq!(h.runs.len(), sum.runs);
    for r in &h.runs {
        if r.source != install_image::Source::Zero
            && r.disk_offset >= 34 * 512
            && r.end() <= s.disk_bytes() - 33 * 512
        {
            assert!(r.disk_offset % 4096 == 0, "unaligned run {r:?}");
        }
        // No run crosses a partition boundary.
        for p in &s.table.partitions {
            let (a, b) = (p.offset_bytes(), p.offset_bytes() + p.size_bytes());
            assert!(
                r.end() <= a || r.disk_offset >= b || (r.disk_offset >= a && r.end() <= b),
                "{r:?} crosses {}",
                p.name
            );
        }
    }
    let (ra, _) = s.part("root-a");
    assert!(h
        .runs
        .iter()
        .any(|r| r.disk_offset == ra && r.source == install_image::Source::Root { offset: 0 }));
    let (rb, rb_len) = s.part("root-b");
    assert!(
        h.runs
            .iter()
            .all(|r| r.end() <= rb || r.disk_offset >= rb + rb_len),
        "the B slot is not in the image"
    );

    // The same disk gives the same bytes.
    let again = s.path("again.img");
    kiln::image::install::write(
        &s.disk,
        s.part("root-a"),
        &s.root,
        s.part("root-a-verity"),
        &s.verity,
        &again,
    )
    .unwrap();
    assert!(
        std::fs::read(&again).unwrap() == std::fs::read(&s.image).unwrap(),
        "not deterministic"
    );
    assert!(!s.path("again.tmp").exists());
}

#[test]
fn writer_refuses_a_root_that_is_not_on_the_disk() {
    let (mkfs, ..) = need_tools!();
    let s = source(&mkfs);
    let other = s.path("other.squashfs");
    let mut b = std::fs::read(&s.root).unwrap();
    b[1_000_000] ^= 0x10;
    std::fs::write(&other, b).unwrap();
    let out = s.path("x.img");
    let msg = format!(
        "{:#}",
        kiln::image::install::write(
            &s.disk,
            s.part("root-a"),
            &other,
            s.part("root-a-verity"),
            &s.verity,
            &out
        )
        .unwrap_err()
    );
    assert!(
        msg.contains("does not hold the root squashfs") && msg.contains("differ at byte 1000000"),
        "{msg}"
    );
    let msg = format!(
        "{:#}",
        kiln::image::install::write(
            &s.disk,
            s.part("root-b"),
            &s.root,
            s.part("root-a-verity"),
            &s.verity,
            &out
        )
        .unwrap_err()
    );
    assert!(msg.contains("does not hold"), "{msg}");
    let msg = format!(
        "{:#}",
        kiln::image::install::write(
            &s.disk,
            (12345, 4096),
            &s.root,
            s.part("root-a-verity"),
            &s.verity,
            &out
        )
        .unwrap_err()
    );
    assert!(
        msg.contains("no partition") && msg.contains("root-a"),
        "{msg}"
    );
    assert!(!out.exists());
}

#[test]
fn installs_onto_a_larger_empty_disk() {
    let (mkfs, sgdisk, e2fsck) = need_tools!();
    let s = source(&mkfs);
    let target = s.path("target.raw");
    let bytes = s.disk_bytes() + 64 * MIB;
    let t = sparse(&target, bytes, None);
    let mut seen: Vec<Progress> = Vec::new();
    let report = apply(
        &mut File::open(&s.image).unwrap(),
        &mut File::open(&s.root).unwrap(),
        &mut File::open(&s.verity).unwrap(),
        &t,
        bytes,
        |p| seen.push(p),
    )
    .unwrap();
    drop(t);
    assert_eq!(report.runs, s.summary.runs);
    assert_eq!(
        report.bytes_written,
        s.summary.packed_bytes + s.summary.root_bytes + s.summary.verity_bytes
    );
    let last = seen.last().unwrap();
    assert_eq!(last.done, last.total);
    assert!(seen.windows(2).all(|w| w[0].done <= w[1].done));

    assert_eq!(
        first_difference(&target, &s.disk, 0, s.disk_bytes()),
        None,
        "the target is disk.raw, byte for byte"
    );
    assert_eq!(std::fs::metadata(&target).unwrap().len(), bytes);
    check_disk(&s, &target, &sgdisk, &e2fsck);
}

#[test]
fn installs_onto_a_used_disk() {
    let (mkfs, sgdisk, e2fsck) = need_tools!();
    let s = source(&mkfs);
    let target = s.path("target.raw");
    let bytes = s.disk_bytes() + 16 * MIB;
    // A disk full of someone else's data, with its own GPT at both ends.
    let t = sparse(&target, bytes, Some(0x5A));
    let mut old = Layout::new(deterministic_guid("old", "disk"));
    old.add(
        "old",
        gpt::types::LINUX_DATA,
        deterministic_guid("old", "p"),
        PartSize::Rest,
        0,
    );
    old.build(bytes).unwrap().write(&mut &t).unwrap();
    install(&s, &s.image, &t, bytes).unwrap();
    drop(t);

    // Equal to disk.raw except where nothing reads: the B slots and the
    // root-a slots past the squashfs and tree.
    let mut same = vec![];
    let mut from = 0;
    for (name, used) in [
        ("root-a", s.summary.root_bytes),
        ("root-a-verity", s.summary.verity_bytes),
        ("root-b", 0),
        ("root-b-verity", 0),
    ] {
        let (off, len) = s.part(name);
        same.push((from, off + used));
        from = off + len;
    }
    same.push((from, s.disk_bytes()));
    for (a, b) in same {
        assert_eq!(first_difference(&target, &s.disk, a, b), None, "[{a}, {b})");
    }
    let (rb, _) = s.part("root-b");
    let mut x = [0u8; 4];
    File::open(&target)
        .unwrap()
        .read_exact_at(&mut x, rb)
        .unwrap();
    assert_eq!(x, [0x5A; 4], "the B slot is left alone");
    // The old backup GPT at the end of the disk is gone.
    let mut tail = vec![0u8; 512];
    File::open(&target)
        .unwrap()
        .read_exact_at(&mut tail, bytes - 512)
        .unwrap();
    assert!(tail.iter().all(|b| *b == 0));
    check_disk(&s, &target, &sgdisk, &e2fsck);
}

#[test]
fn damaged_images_are_refused_before_any_write() {
    let (mkfs, ..) = need_tools!();
    let s = source(&mkfs);
    let good = std::fs::read(&s.image).unwrap();
    let h = install_image::Header::decode(&mut &good[..]).unwrap();
    let bytes = s.disk_bytes() + MIB;
    let try_image = |b: &[u8], want: &str| {
        let p = s.path("bad.img");
        std::fs::write(&p, b).unwrap();
        let t = Cut::new(sparse(&s.path("t.raw"), bytes, None), u64::MAX);
        let msg = install(&s, &p, &t, bytes).unwrap_err().to_string();
        assert!(msg.contains(want), "wanted {want:?} in {msg:?}");
        assert_eq!(t.writes.get(), 0, "{msg}");
    };
    // A flipped byte in the packed area: caught by its run's sha256 before
    // the target is touched.
    let first_packed = h
        .runs
        .iter()
        .find(|r| matches!(r.source, install_image::Source::Packed { .. }))
        .unwrap();
    let mut b = good.clone();
    let last = b.len() - 1;
    b[last] ^= 1;
    try_image(&b, "do not match their checksum");
    let mut b = good.clone();
    b[h.packed_start() as usize] ^= 0x80;
    try_image(&b, &format!("disk offset {}", first_packed.disk_offset));
    // In the header: the header's own sha256.
    let mut b = good.clone();
    b[40] ^= 1;
    try_image(&b, "header checksum mismatch");
    // Truncated, or with something appended.
    try_image(&good[..good.len() - 4096], "is truncated");
    try_image(&good[..100], "ends inside the header");
    try_image(&good[..0], "ends inside the header");
    let mut b = good.clone();
    b.extend_from_slice(b"junk");
    try_image(&b, "trailing data");
}

#[test]
fn refuses_a_small_disk_and_short_sources() {
    let (mkfs, ..) = need_tools!();
    let s = source(&mkfs);
    let small = s.disk_bytes() - MIB;
    let t = Cut::new(sparse(&s.path("t.raw"), small, None), u64::MAX);
    let msg = install(&s, &s.image, &t, small).unwrap_err().to_string();
    assert!(
        msg.contains(&small.to_string()) && msg.contains(&s.disk_bytes().to_string()),
        "{msg}"
    );
    assert_eq!(t.writes.get(), 0);

    let short = s.path("short.squashfs");
    std::fs::write(&short, &std::fs::read(&s.root).unwrap()[..4096]).unwrap();
    let bytes = s.disk_bytes();
    let t = Cut::new(sparse(&s.path("t2.raw"), bytes, None), u64::MAX);
    let msg = apply(
        &mut File::open(&s.image).unwrap(),
        &mut File::open(&short).unwrap(),
        &mut File::open(&s.verity).unwrap(),
        &t,
        bytes,
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("root source is 4096 bytes"), "{msg}");
    assert_eq!(t.writes.get(), 0);
}

#[test]
fn a_power_cut_leaves_no_partition_table_without_contents() {
    let (mkfs, ..) = need_tools!();
    let s = source(&mkfs);
    let bytes = s.disk_bytes() + 8 * MIB;
    let target = s.path("cut.raw");
    // How much a full install writes (zeros included, as this target has
    // no fast zeroing).
    let total = {
        let t = Cut::new(sparse(&target, bytes, Some(0x33)), u64::MAX);
        install(&s, &s.image, &t, bytes).unwrap();
        t.written.get()
    };
    let header = install_image::Header::decode(&mut File::open(&s.image).unwrap()).unwrap();
    let table: u64 = header
        .runs
        .iter()
        .filter(|r| header.is_table_run(r))
        .map(|r| r.len)
        .sum();
    let tables_start = total - table;
    let primary_start = total - 4096;
    let cuts = [
        0,
        1,
        MIB + 7,
        total / 3,
        total / 2,
        tables_start - 1,
        tables_start,
        tables_start + 100,
        primary_start,
        primary_start + 511,
        primary_start + 1000,
        total - 1,
    ];
    for cut in cuts {
        let t = Cut::new(sparse(&target, bytes, Some(0x33)), cut);
        let err = install(&s, &s.image, &t, bytes).unwrap_err().to_string();
        assert!(err.contains("power cut"), "{err}");
        drop(t);
        let gpt = Gpt::read(&mut File::open(&target).unwrap());
        if cut < primary_start + 512 {
            assert!(
                gpt.is_err(),
                "cut after {cut} of {total} bytes: a valid GPT"
            );
        }
        if gpt.is_ok() {
            // Only once the last block is (nearly) down, and then the
            // contents are all there.
            let (ra, _) = s.part("root-a");
            assert_eq!(
                first_difference(&target, &s.disk, 4096, ra + s.summary.root_bytes),
                None,
                "cut at {cut}"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    #[test]
    fn init_sha256_agrees_with_sha2(data in proptest::collection::vec(any::<u8>(), 0..3000), split in 0usize..3000) {
        use sha2::Digest;
        let want: [u8; 32] = sha2::Sha256::digest(&data).into();
        prop_assert_eq!(kiln_contract::digest::sha256(&data), want);
        let mut h = kiln_contract::digest::Sha256::new();
        let at = split.min(data.len());
        h.update(&data[..at]);
        h.update(&data[at..]);
        prop_assert_eq!(h.finalize(), want);
    }
}

#[test]
fn writes_flush_through_a_file_target() {
    // The File impl zeroes a regular file by punching holes, or by writing.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("f");
    let f = sparse(&p, 4 * MIB, Some(0xEE));
    f.zero_range(4096, 2 * MIB).unwrap();
    f.zero_range(3 * MIB + 1, 100).unwrap();
    f.flush_to_disk().unwrap();
    f.drop_cache();
    let b = std::fs::read(&p).unwrap();
    assert!(b[..4096].iter().all(|x| *x == 0xEE));
    assert!(b[4096..4096 + 2 * MIB as usize].iter().all(|x| *x == 0));
    assert_eq!(b[3 * MIB as usize], 0xEE);
    assert!(b[3 * MIB as usize + 1..3 * MIB as usize + 101]
        .iter()
        .all(|x| *x == 0));
    assert_eq!(b[3 * MIB as usize + 101], 0xEE);
}
