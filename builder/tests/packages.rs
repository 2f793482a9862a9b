//! `[[rootfs.packages]]` with real Debian 12 amd64 packages, fetched through
//! kiln's pinned-input path (apt-get download, into the kiln cache) and
//! unpacked into a rootfs tree the way the pipeline's packages stage does,
//! without building an image: runc with its libraries loads; runc without
//! libseccomp2 is a build error naming both.

use kiln::inputs::cache::Cache;
use kiln::inputs::packages::{self, Package, PackageFile};
use kiln::arch::Arch;
use kiln_formats::tree::{Kind, Tree};

const RUNC: (&str, &str, &str) = ("runc", "1.1.5+ds1-1+deb12u1", "a00351f8c0318de0b424ecf5cd0fdb69880a89f3511cae4f6fff7de3e57881c5");
const LIBSECCOMP2: (&str, &str, &str) = ("libseccomp2", "2.5.4-1+deb12u1", "108fe67957ca7cf9ba51d801118a1b37d404bea7b6e365025cd00779e9eca38d");
const LIBC6: (&str, &str, &str) = ("libc6", "2.36-9+deb12u14", "ba4f88f73dbc3ae9055f3c20f4523bfdbaf1ad13ff95e258924f77d20b4fbedf");

fn fetch(list: &[(&str, &str, &str)]) -> Vec<Package> {
    let files: Vec<PackageFile> = list.iter().map(|(deb, version, sha256)| PackageFile { deb: deb.to_string(), version: version.to_string(), sha256: sha256.to_string(), arch: None, exclude: None, file: None }).collect();
    let specs = packages::spec(&files, Arch::Amd64).unwrap();
    packages::resolve(&specs, Arch::Amd64.debian(), &Cache::default_location()).unwrap_or_else(|e| panic!("{e}\n(the packages come from the host's apt: `apt-get update` first)"))
}

/// What kiln itself puts in a root before the packages stage, in small.
fn kiln_tree() -> Tree {
    let mut t = Tree::new();
    t.file("/sbin/kiln-init", "static kiln-init", 0o755).unwrap();
    t.symlink("/init", "sbin/kiln-init").unwrap();
    t.file("/bin/busybox", "static busybox", 0o755).unwrap();
    t.symlink("/bin/sh", "busybox").unwrap();
    t.file("/etc/kiln/node.toml", "role = \"worker\"\n", 0o644).unwrap();
    t.mkdir_p("/lib/modules", 0o755).unwrap();
    t
}

#[test]
fn runc_with_its_libraries_loads() {
    let pkgs = fetch(&[RUNC, LIBSECCOMP2, LIBC6]);
    let mut t = kiln_tree();
    let owners = packages::add_and_check(&mut t, &pkgs, Arch::Amd64, &Cache::default_location()).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(owners.get("/usr/sbin/runc").map(String::as_str), Some("runc"));
    assert!(matches!(t.get("/usr/sbin/runc").map(|e| (&e.kind, e.mode)), Some((Kind::File(_), 0o755))));
    // The loader is libc6's symlink into the multiarch dir, followed in the tree.
    let (ld, _) = t.lookup("/lib64/ld-linux-x86-64.so.2").unwrap();
    assert_eq!(ld, "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2");
    assert!(t.lookup("/usr/lib/x86_64-linux-gnu/libseccomp.so.2").is_some());
    // Docs, man pages and lintian overrides are left out by default; kiln's
    // own entries are kept.
    assert!(t.iter().all(|(p, _)| !p.starts_with("/usr/share/doc") && !p.starts_with("/usr/share/man") && !p.starts_with("/usr/share/lintian")));
    assert!(matches!(t.get("/bin/sh").map(|e| &e.kind), Some(Kind::Symlink(s)) if s == "busybox"));
    // Recorded like other Debian inputs: the whole .deb, pinned.
    let r = &pkgs[0].resolved;
    assert_eq!((r.kind, r.name.as_str(), r.sha256.as_str()), ("deb", "rootfs.packages.runc", RUNC.2));
    let deb = r.deb.as_ref().unwrap();
    assert_eq!((deb.package.as_str(), deb.arch.as_str(), deb.member.as_deref()), ("runc", "amd64", None));
}

#[test]
fn runc_without_libseccomp_fails_naming_both() {
    let pkgs = fetch(&[RUNC, LIBC6]);
    let mut t = kiln_tree();
    let e = packages::add_and_check(&mut t, &pkgs, Arch::Amd64, &Cache::default_location()).unwrap_err().to_string();
    assert!(
        e.contains("rootfs.packages: /usr/sbin/runc (package runc) needs libseccomp.so.2, which is not in the image (looked in /lib/x86_64-linux-gnu, /usr/lib/x86_64-linux-gnu, /lib, /usr/lib); add the Debian package that has it (apt-file search libseccomp.so.2, e.g. libseccomp2) to [[rootfs.packages]]"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "only runc misses a library: {e}");
    // Without libc6 as well, every miss is reported, the loader included.
    let e = packages::add_and_check(&mut kiln_tree(), &pkgs[..1], Arch::Amd64, &Cache::default_location()).unwrap_err().to_string();
    for want in ["needs libseccomp.so.2", "needs libc.so.6", "needs the program interpreter /lib64/ld-linux-x86-64.so.2"] {
        assert!(e.contains(want), "{want}: {e}");
    }
    // amd64 programs in an arm64 image: named, with what to do.
    let e = packages::check_elves(&t, Arch::Arm64, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("/usr/sbin/runc is built for x86-64 (amd64), but the profile's arch is arm64; take the arm64 build"), "{e}");
}

#[test]
fn a_vendors_own_deb_from_a_file() {
    let cache = Cache::default_location();
    let apt = fetch(&[RUNC]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&apt[0].resolved.path, dir.path().join("runc.deb")).unwrap();
    let mut file = PackageFile { deb: RUNC.0.into(), version: RUNC.1.into(), sha256: RUNC.2.into(), arch: None, exclude: None, file: Some("runc.deb".into()) };
    file.anchor(dir.path());
    let specs = packages::spec(&[file.clone()], Arch::Amd64).unwrap();
    let local = packages::resolve(&specs, "amd64", &cache).unwrap_or_else(|e| panic!("{e}"));
    let r = &local[0].resolved;
    assert_eq!((r.kind, r.version.as_deref(), r.sha256.as_str()), ("file", Some(RUNC.1), RUNC.2));
    let mut t = kiln_tree();
    packages::add_to(&mut t, &local, &cache).unwrap();
    assert!(t.get("/usr/sbin/runc").is_some());
    // The file must be what the entry says it is.
    file.version = "9.9-1".into();
    let e = packages::resolve(&packages::spec(&[file], Arch::Amd64).unwrap(), "amd64", &cache).unwrap_err().to_string();
    assert!(e.starts_with("rootfs.packages[0] (runc): ") && e.contains("runc.deb has Version: 1.1.5+ds1-1+deb12u1, but the profile says 9.9-1"), "{e}");
}

#[test]
fn a_package_over_kilns_own_files_is_an_error() {
    let pkgs = fetch(&[RUNC]);
    let mut t = kiln_tree();
    t.file("/usr/sbin/runc", "kiln's", 0o755).unwrap();
    let e = packages::add_to(&mut t, &pkgs, &Cache::default_location()).unwrap_err().to_string();
    assert!(e.starts_with("rootfs.packages[0] (runc): /usr/sbin/runc is also put there by kiln itself"), "{e}");
    assert!(e.contains("exclude = [\"usr/sbin/runc\"]"), "{e}");
    // Two packages with one file: both named.
    let twice = [pkgs[0].clone(), Package { key: "rootfs.packages[1]".into(), ..pkgs[0].clone() }];
    let e = packages::add_to(&mut kiln_tree(), &twice, &Cache::default_location()).unwrap_err().to_string();
    assert!(e.starts_with("rootfs.packages[1] (runc): /") && e.contains("is also put there by package runc"), "{e}");
}
