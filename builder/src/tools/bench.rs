//! `kiln bench PROFILE`: a warm `kiln build` of the profile against what
//! any image builder must at least do with the same root tree, measured in
//! the same run on the same machine: `mksquashfs` (zstd at kiln's level, no
//! fragments, all cores) and `veritysetup format` of its output. It prints
//! each run, the medians, the ratio, and where the build's time went, step
//! by step. The timed builds compress everything (no packed files from the
//! cache); one more build then shows a rebuild that takes them from there,
//! as a build with an unchanged k0s and images does.
//!
//! With `--real-size`, the profile is first extended with the real-size
//! fixture ([`crate::tools::fixture`]): a file of k0s's size in the root
//! (`/usr/lib/kiln-fixture/`) and an airgap-like image tarball as an
//! appliance image. The payload stays what the profile says (the stand-in
//! in the example profiles); the fixture is never presented as k0s.

use crate::arch::Arch;
use crate::inputs::cache::Cache;
use crate::progress::{Steps, Timing};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Where the fixture's k0s-sized file goes in the root.
pub const FIXTURE_DIR: &str = "/usr/lib/kiln-fixture";

/// A profile extending `base` with the real-size fixture for `arch`,
/// written into `dir`; returns its path.
pub fn real_size_profile(base: &Path, arch: Arch, dir: &Path, cache: &Cache) -> Result<PathBuf> {
    let f = crate::tools::fixture::real_size(arch, cache)?;
    let base = base.canonicalize().with_context(|| format!("reading {}", base.display()))?;
    let p = crate::profile::load(&base)?;
    let mut text = real_size_profile_text(&base, &p.name, arch, &f);
    // The base's node config, where the base finds it (a profile's relative
    // paths are taken from the profile that is built).
    text.push_str(&format!("\n[node]\nconfig = {}\n", toml_str(&p.node_config.canonicalize().unwrap_or(p.node_config.clone()).display().to_string())));
    if let Some(k) = &p.config_key {
        text.push_str(&format!("config_key = {}\n", toml_str(&k.display().to_string())));
    }
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("{}-real-size.toml", p.name));
    std::fs::write(&path, text)?;
    Ok(path)
}

fn real_size_profile_text(base: &Path, name: &str, arch: Arch, f: &crate::tools::fixture::RealSize) -> String {
    format!(
        "# The real-size fixture (not k0s): a file of k0s's size and an airgap-like\n\
         # image tarball, on top of {base}.\n\
         extends = {base_q}\n\
         name = \"{name}-real-size\"\n\
         {rest}",
        base = base.display(),
        base_q = toml_str(&base.display().to_string()),
        rest = fixture_toml(arch, f),
    )
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// The profile keys that add the real-size fixture `f` to a profile for
/// `arch`: `[disk]` with the slots sized from the root, a `[[rootfs.files]]`
/// entry for the k0s-sized file and the image tarball as an appliance
/// image. Tests append it to their own profiles.
pub fn fixture_toml(arch: Arch, f: &crate::tools::fixture::RealSize) -> String {
    format!(
        "\n[disk]\n\
         root_slot_mib = \"auto\"\n\
         \n\
         [[rootfs.files]]\n\
         path = \"{FIXTURE_DIR}/{elf_name}\"\n\
         file = {elf}\n\
         sha256 = \"{elf_sha}\"\n\
         mode = \"0755\"\n\
         \n\
         [appliance.images]\n\
         \"{images_name}\" = {{ file = {images}, sha256 = \"{images_sha}\" }}\n",
        elf_name = crate::tools::fixture::elf_name(arch),
        elf = toml_str(&f.elf.display().to_string()),
        elf_sha = f.elf_sha256,
        images_name = crate::tools::fixture::images_name(arch),
        images = toml_str(&f.images.display().to_string()),
        images_sha = f.images_sha256,
    )
}

/// One run's figures.
struct Run {
    build: f64,
    steps: Vec<Timing>,
    mksquashfs: f64,
    veritysetup: f64,
}

pub fn bench(profile: &Path, runs: u32, real_size: bool, cache: &Cache) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let profile = if real_size {
        let arch = crate::profile::load(profile)?.arch;
        let p = real_size_profile(profile, arch, dir.path(), cache)?;
        println!("real-size fixture for {arch}: {}", p.display());
        p
    } else {
        profile.to_path_buf()
    };
    // Warm the caches (kernel, inputs, node binaries) first; not timed.
    let first = crate::pipeline::build_with(&profile, &dir.path().join("warm"), cache, &Steps::new(true))?;
    let root = dir.path().join("root");
    extract_root(&first.out, &root, dir.path())?;
    let level = kiln_formats::squashfs::Options::default().compression_level;
    println!(
        "root: {} MB of files, squashfs {} MB ({} MB stored as is: already compressed)",
        first.squashfs.data_in / 1_000_000,
        first.squashfs.bytes / 1_000_000,
        first.squashfs.stored_raw / 1_000_000
    );
    let mut all = Vec::new();
    for i in 0..runs {
        let out = dir.path().join(format!("run{i}"));
        let t = Instant::now();
        let b = crate::pipeline::build_with(&profile, &out, cache, &Steps::new(true).without_reuse())?;
        let build = t.elapsed().as_secs_f64();
        std::fs::remove_dir_all(&out)?;
        let sq = dir.path().join("mk.sqfs");
        let t = Instant::now();
        let st = Command::new("mksquashfs")
            .arg(&root)
            .arg(&sq)
            .args(["-comp", "zstd", "-Xcompression-level", &level.to_string(), "-b", "131072", "-no-fragments", "-no-xattrs", "-noappend", "-quiet", "-no-progress", "-all-root"])
            .status()
            .context("running mksquashfs (apt-get install squashfs-tools)")?;
        let mksquashfs = t.elapsed().as_secs_f64();
        if !st.success() {
            bail!("mksquashfs failed");
        }
        let hash = dir.path().join("mk.verity");
        let t = Instant::now();
        let out = Command::new("veritysetup").arg("format").arg(&sq).arg(&hash).output().context("running veritysetup (apt-get install cryptsetup-bin)")?;
        let veritysetup = t.elapsed().as_secs_f64();
        if !out.status.success() {
            bail!("veritysetup format failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        std::fs::remove_file(&sq)?;
        std::fs::remove_file(&hash)?;
        println!("run {}: kiln build {build:.2}s; mksquashfs {mksquashfs:.2}s + veritysetup format {veritysetup:.2}s; ratio {:.2}", i + 1, build / (mksquashfs + veritysetup));
        all.push(Run { build, steps: b.timings, mksquashfs, veritysetup });
    }
    let med = |f: &dyn Fn(&Run) -> f64| {
        let mut v: Vec<f64> = all.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (b, m, v) = (med(&|r| r.build), med(&|r| r.mksquashfs), med(&|r| r.veritysetup));
    let outputs: Vec<&str> = crate::profile::load(&profile)?.outputs.iter().map(|o| o.name()).collect();
    println!("kiln build (every output: {}): {b:.2}s, median of {runs}", outputs.join(", "));
    println!("mksquashfs + veritysetup format of the same root tree: {m:.2}s + {v:.2}s = {:.2}s, median of {runs}", m + v);
    println!("ratio kiln build / (mksquashfs + veritysetup): {:.2}", b / (m + v));
    println!("where the build's time went (median per step):");
    let names: Vec<String> = all[0].steps.iter().map(|t| t.step.clone()).collect();
    for n in names {
        let s = med(&|r| r.steps.iter().find(|t| t.step == n).map_or(0.0, |t| t.seconds));
        println!("  {n:<28} {s:>7.2}s {:>5.1}%", s * 100.0 / b);
    }
    let out = dir.path().join("rebuild");
    let t = Instant::now();
    let r = crate::pipeline::build_with(&profile, &out, cache, &Steps::new(true))?;
    println!(
        "a rebuild taking the large files' packed blocks from the cache ({} MB of {} MB): {:.2}s, ratio {:.2}",
        r.squashfs.reused / 1_000_000,
        r.squashfs.data_in / 1_000_000,
        t.elapsed().as_secs_f64(),
        t.elapsed().as_secs_f64() / (m + v)
    );
    println!("peak RSS of this process (builds and all): {} MB", peak_rss_kib() / 1024);
    Ok(())
}

/// The root tree of a build, as files, from root-a of its disk image.
fn extract_root(out: &Path, root: &Path, scratch: &Path) -> Result<()> {
    let disk = out.join("disk.raw");
    if !disk.exists() {
        bail!("the profile has no disk output; the benchmark compares the disk build with mksquashfs of its root");
    }
    let parts = kiln_formats::gpt::Gpt::read(&mut std::fs::File::open(&disk)?)?;
    let ra = parts.partitions.iter().find(|p| p.name == "root-a").context("the disk has no root-a")?;
    let sqfs = scratch.join("root-a.sqfs");
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(&disk)?;
        f.seek(SeekFrom::Start(ra.offset_bytes()))?;
        std::io::copy(&mut f.take(ra.size_bytes()), &mut std::fs::File::create(&sqfs)?)?;
    }
    let st = Command::new("unsquashfs").args(["-q", "-n", "-d"]).arg(root).arg(&sqfs).output().context("running unsquashfs (apt-get install squashfs-tools)")?;
    if !st.status.success() {
        bail!("unsquashfs: {}", String::from_utf8_lossy(&st.stderr));
    }
    std::fs::remove_file(&sqfs)?;
    Ok(())
}

fn peak_rss_kib() -> u64 {
    // SAFETY: getrusage fills the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) } != 0 {
        return 0;
    }
    u.ru_maxrss as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fixture_profile_extends_the_base_and_names_itself() {
        let f = crate::tools::fixture::RealSize { elf: "/c/k0s-sized".into(), elf_sha256: "a".repeat(64), images: "/c/img \"x\".tar".into(), images_sha256: "b".repeat(64) };
        let text = real_size_profile_text(Path::new("/p/qemu-amd64.toml"), "qemu-amd64", Arch::Amd64, &f);
        let v: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(v["extends"].as_str(), Some("/p/qemu-amd64.toml"));
        assert_eq!(v["name"].as_str(), Some("qemu-amd64-real-size"));
        assert_eq!(v["rootfs"]["files"][0]["path"].as_str(), Some("/usr/lib/kiln-fixture/kiln-fixture-k0s-sized-amd64"));
        assert_eq!(v["appliance"]["images"]["kiln-fixture-images-amd64.tar"]["file"].as_str(), Some("/c/img \"x\".tar"));
        assert!(!text.contains("[payload]"), "the payload stays the base profile's");
    }
}
