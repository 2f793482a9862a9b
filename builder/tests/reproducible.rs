//! Reproducibility: the same profile and inputs give byte-identical outputs
//! from another checkout at another path, run from another directory, with
//! a cold cache of its own, another umask, time zone and locale, minutes
//! later. `SOURCE_DATE_EPOCH` moves the recorded timestamps and nothing else.
//!
//! One test, because it is one expensive experiment: build B compiles the
//! kernel from scratch (the only cold kernel build this suite adds), fetches
//! every .deb from the Debian mirror and compiles the node binaries anew.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const PROFILE: &str = "qemu-amd64";
/// 2023-11-14 22:13:20 UTC.
const EPOCH: u64 = 1_700_000_000;

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// How one build runs: from where, with which cache and environment.
struct Run<'a> {
    tree: &'a Path,
    cwd: &'a Path,
    out: &'a Path,
    /// `XDG_CACHE_HOME` for a cache of its own; `None` is the normal cache.
    xdg_cache: Option<&'a Path>,
    env: &'a [(&'a str, &'a str)],
    umask: &'a str,
}

/// Runs `kiln build` and returns its output directory and what it printed.
fn build(r: &Run) -> (PathBuf, String) {
    std::fs::create_dir_all(r.cwd).unwrap();
    let profile = r.tree.join("profiles").join(format!("{PROFILE}.toml"));
    let mut c = Command::new("sh");
    c.arg("-c").arg(format!("umask {} && exec \"$0\" \"$@\"", r.umask));
    c.arg(env!("CARGO_BIN_EXE_kiln")).arg("build").arg(&profile).arg("--out").arg(r.out).current_dir(r.cwd);
    for k in ["SOURCE_DATE_EPOCH", "KILN_SOURCE_DIR", "KILN_NODE_BINARIES", "KILN_SIGNING_KEY", "TZ", "LANG", "LC_ALL"] {
        c.env_remove(k);
    }
    if let Some(x) = r.xdg_cache {
        c.env_remove("KILN_CACHE_DIR").env("XDG_CACHE_HOME", x);
    }
    c.envs(r.env.iter().copied());
    let t = Instant::now();
    let out = c.output().expect("running kiln");
    let text = kiln_testkit::output_text(&out);
    assert!(out.status.success(), "kiln build {} from {} failed:\n{text}", profile.display(), r.cwd.display());
    eprintln!("{:.0}s: {}", t.elapsed().as_secs_f64(), text.lines().find(|l| l.starts_with("built ")).unwrap_or_default());
    (r.out.join(PROFILE), text)
}

/// Every regular file under `dir`, by path relative to it.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.insert(p.strip_prefix(dir).unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap());
            }
        }
    }
    out
}

/// The files that are missing on one side or differ, one line each.
fn differences(a: &BTreeMap<String, Vec<u8>>, b: &BTreeMap<String, Vec<u8>>) -> Vec<String> {
    let mut d = Vec::new();
    for (name, bytes) in a {
        match b.get(name) {
            None => d.push(format!("{name}: only in the first build")),
            Some(other) if other != bytes => d.push(format!("{name}: differs ({} and {} bytes)", bytes.len(), other.len())),
            Some(_) => {}
        }
    }
    d.extend(b.keys().filter(|n| !a.contains_key(*n)).map(|n| format!("{n}: only in the second build")));
    d
}

fn assert_identical(what: &str, a: &Path, b: &Path) {
    let d = differences(&files(a), &files(b));
    assert!(
        d.is_empty(),
        "{what}: {} file(s) differ between {} and {}:\n  {}\n(compare them with `diffoscope`)",
        d.len(),
        a.display(),
        b.display(),
        d.join("\n  ")
    );
}

/// The kiln tree without build products: what a fresh checkout holds.
fn copy_tree(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name == "target" || name.starts_with('.') {
            continue;
        }
        let ft = e.file_type().unwrap();
        let to = dst.join(&*name);
        if ft.is_dir() {
            copy_tree(&e.path(), &to);
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(e.path()).unwrap(), &to).unwrap();
        } else {
            std::fs::copy(e.path(), &to).unwrap();
        }
    }
}

fn sh(cmd: &str) -> Vec<u8> {
    let out = Command::new("sh").arg("-c").arg(cmd).env("TZ", "UTC").env("LC_ALL", "C").output().unwrap();
    assert!(out.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
    out.stdout
}

/// The PXE initramfs decompressed by zstd (its frames end to end: stage 1,
/// then the root), and its entries.
fn initramfs(out: &Path) -> (Vec<u8>, Vec<kiln_formats::cpio::Member>) {
    let bytes = sh(&format!("zstd -dc {}", out.join("pxe/initramfs.cpio.zst").display()));
    let members = kiln_formats::cpio::list(&bytes).unwrap_or_else(|e| panic!("the PXE initramfs: {e}"));
    (bytes, members)
}

/// The root squashfs the PXE initramfs carries.
fn root_squashfs(out: &Path, scratch: &Path) -> PathBuf {
    let p = scratch.join("root.squashfs");
    let (bytes, members) = initramfs(out);
    let m = members.iter().find(|m| m.name == "kiln/root.squashfs").expect("kiln/root.squashfs in the PXE initramfs");
    std::fs::write(&p, &bytes[m.data.clone()]).unwrap();
    p
}

/// `unsquashfs -lln`, with every `YYYY-MM-DD HH:MM` replaced by `<time>`,
/// and the times it had.
fn listing_without_times(sqfs: &Path) -> (String, Vec<String>) {
    let text = String::from_utf8(sh(&format!("unsquashfs -lln {}", sqfs.display()))).unwrap();
    let mut times = Vec::new();
    // `9` is any digit.
    let shaped = |w: &str, shape: &str| w.len() == shape.len() && w.bytes().zip(shape.bytes()).all(|(c, s)| if s == b'9' { c.is_ascii_digit() } else { c == s });
    let lines: Vec<String> = text
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            match f.windows(2).position(|w| shaped(w[0], "9999-99-99") && shaped(w[1], "99:99")) {
                Some(i) => {
                    times.push(format!("{} {}", f[i], f[i + 1]));
                    l.replacen(&format!("{} {}", f[i], f[i + 1]), "<time>", 1)
                }
                _ => l.to_string(),
            }
        })
        .collect();
    (lines.join("\n"), times)
}

/// The ISO 9660 primary volume descriptor's creation date (`YYYYMMDDHHMMSScc`).
fn iso_creation_date(iso: &Path) -> String {
    let b = std::fs::read(iso).unwrap();
    let pvd = &b[16 * 2048..17 * 2048];
    assert_eq!(&pvd[1..6], b"CD001", "{} has no primary volume descriptor", iso.display());
    String::from_utf8_lossy(&pvd[813..829]).into_owned()
}

#[test]
fn outputs_are_byte_identical_across_trees_caches_and_time() {
    let ws = workspace();
    let scratch = ws.join("target/reproducible");
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();

    // A: this checkout and the normal cache, warm or cold as this run has it.
    let (a, _) = build(&Run { tree: &ws, cwd: &ws, out: &scratch.join("a"), xdg_cache: None, env: &[], umask: "022" });
    let fa = files(&a);
    for want in ["pxe/vmlinuz", "pxe/initramfs.cpio.zst", "pxe/boot.ipxe", "manifest.json", "qemu-amd64.iso", "disk.raw", "disk.qcow2", "disk.bmap"] {
        assert!(fa.contains_key(want), "missing {want}: {:?}", fa.keys());
    }
    // The manifest lists every artifact with its sha256.
    let m: serde_json::Value = serde_json::from_slice(&fa["manifest.json"]).unwrap();
    let arts = m["artifacts"].as_array().unwrap();
    for (name, bytes) in &fa {
        if name == "manifest.json" {
            continue;
        }
        let entry = arts.iter().find(|x| x["path"] == name.as_str()).unwrap_or_else(|| panic!("{name} not in the manifest"));
        assert_eq!(entry["sha256"].as_str().unwrap(), kiln::inputs::input::sha256_bytes(bytes));
    }
    assert!(m["inputs"].as_array().unwrap().iter().any(|i| i["source"].as_str().unwrap_or("").starts_with("linux-source-6.1")));
    assert!(m["payload"]["description"].as_str().unwrap().contains("not k0s"));
    // The initramfs is zstd that the zstd tool reads, holding cpio archives
    // of stage 1 (GNU cpio lists the first) and of the verified root
    // (squashfs + hash tree) with its sizes.
    let listing = String::from_utf8(sh(&format!("zstd -dc {} | cpio -it --quiet", a.join("pxe/initramfs.cpio.zst").display()))).unwrap();
    for want in ["init", "sbin/kiln-init"] {
        assert!(listing.lines().any(|l| l == want), "{want} not in the initramfs:\n{listing}");
    }
    let names: Vec<String> = initramfs(&a).1.into_iter().map(|m| m.name).collect();
    for want in ["init", "sbin/kiln-init", "kiln/root.sizes", "kiln/root.squashfs", "kiln/root.verity"] {
        assert!(names.iter().any(|n| n == want), "{want} not in the initramfs: {names:?}");
    }

    // C and D: SOURCE_DATE_EPOCH set, warm cache, from other directories,
    // time zones and umasks. The same bytes both times.
    let epoch = EPOCH.to_string();
    let (c, c_log) = build(&Run {
        tree: &ws,
        cwd: &scratch.join("cwd-c"),
        out: &scratch.join("c"),
        xdg_cache: None,
        env: &[("SOURCE_DATE_EPOCH", &epoch), ("TZ", "UTC")],
        umask: "022",
    });
    assert!(c_log.contains("(kernel cached"), "the warm rebuild must not recompile the kernel:\n{c_log}");
    let (d, _) = build(&Run {
        tree: &ws,
        cwd: &std::env::temp_dir(),
        out: &scratch.join("d"),
        xdg_cache: None,
        env: &[("SOURCE_DATE_EPOCH", &epoch), ("TZ", "KLN-13:45"), ("LANG", "de_DE.UTF-8")],
        umask: "077",
    });
    assert_identical("two builds with SOURCE_DATE_EPOCH", &c, &d);

    // The epoch moves the timestamps, and only them: the same kernel, the
    // same files with the same owners, modes and sizes in the root; the
    // squashfs and ISO dates are the epoch.
    let fc = files(&c);
    assert!(fa["pxe/vmlinuz"] == fc["pxe/vmlinuz"], "the kernel must not depend on SOURCE_DATE_EPOCH (it is cached across epochs)");
    let (sa, sc) = (root_squashfs(&a, &scratch.join("a")), root_squashfs(&c, &scratch.join("c")));
    let mtime = |p: &Path| u32::from_le_bytes(std::fs::read(p).unwrap()[8..12].try_into().unwrap());
    assert_eq!(mtime(&sa), 0, "the profile's source_date_epoch is 0");
    assert_eq!(mtime(&sc) as u64, EPOCH, "the squashfs mtime follows SOURCE_DATE_EPOCH");
    let ((la, ta), (lc, tc)) = (listing_without_times(&sa), listing_without_times(&sc));
    assert_eq!(la, lc, "the root trees differ in more than their times");
    assert!(!ta.is_empty() && ta.iter().all(|t| t == "1970-01-01 00:00"), "{ta:?}");
    assert!(tc.iter().all(|t| t == "2023-11-14 22:13"), "{tc:?}");
    let iso = format!("{PROFILE}.iso");
    assert_eq!(iso_creation_date(&a.join(&iso)), "1970010100000000");
    assert_eq!(iso_creation_date(&c.join(&iso)), "2023111422132000");
    let (ma, mc): (serde_json::Value, serde_json::Value) = (serde_json::from_slice(&fa["manifest.json"]).unwrap(), serde_json::from_slice(&fc["manifest.json"]).unwrap());
    for key in ["inputs", "kernel", "payload", "cmdline"] {
        assert_eq!(ma[key], mc[key], "manifest `{key}` must not depend on SOURCE_DATE_EPOCH");
    }

    // B: a copy of the tree at another path (another length), a cold cache
    // of its own, run from elsewhere with another umask, time zone and locale.
    let tmp = tempfile::Builder::new().prefix("kiln-repro-").tempdir().unwrap();
    let tree_b = tmp.path().join("another/checkout/of/kiln");
    copy_tree(&ws, &tree_b);
    let (b, b_log) = build(&Run {
        tree: &tree_b,
        cwd: &tmp.path().join("elsewhere"),
        out: &scratch.join("b"),
        xdg_cache: Some(&tmp.path().join("xdg-cache")),
        env: &[("TZ", "KLN-13:45"), ("LANG", "de_DE.UTF-8")],
        umask: "027",
    });
    assert!(b_log.contains("(kernel compiled"), "build B must compile its own kernel in its empty cache:\n{b_log}");
    drop(tmp);
    assert_identical("a build from another tree with a cold cache", &a, &b);
}
