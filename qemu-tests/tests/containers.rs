//! Real containers on a kiln worker (issue 9): the image carries Debian's
//! containerd and runc through `[[rootfs.packages]]`, and an OCI image
//! tarball built here from busybox through `[appliance.images]`. The
//! stand-in, shaped like a k0s worker, starts containerd with its state
//! under /var/lib/k0s/containerd, imports every tarball in
//! /var/lib/k0s/images, runs a container with a cgroup v2 memory limit and
//! its own network namespace, and runs one that allocates past its limit
//! (see qemu-tests/src/bin/k0s/containers.rs). Booted on amd64 (the GPT disk,
//! UEFI) and armv7 (the SD card through u-boot, 512 MiB, one CPU).
//!
//! Also: an image with a binary whose library is missing fails at build
//! time, naming both, before anything is compiled.

mod common;

use common::{boot_with, scratch, workspace, BOOT_TIMEOUT};
use kiln::arch::Arch;
use kiln::tools::run::BootFrom;
use kiln_contract::digest::hex;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Debian 12 packages: (name, version, sha256 for amd64, sha256 for armhf).
const PACKAGES: [(&str, &str, &str, &str); 4] = [
    ("containerd", "1.6.20~ds1-1+deb12u3", "8669d264eeb0fcdb4a0b1ba436ab88ec5dafde4a66e1278ec279d830db4c2216", "1854c935db53c3e6dd288d9326f0eace0aec020a0d31325ceb457eb08ac31eea"),
    ("runc", "1.1.5+ds1-1+deb12u1", "a00351f8c0318de0b424ecf5cd0fdb69880a89f3511cae4f6fff7de3e57881c5", "8d6ce6db0c47576b44032a716f5593e5e681603b901df9944621922f404ed0c8"),
    ("libseccomp2", "2.5.4-1+deb12u1", "108fe67957ca7cf9ba51d801118a1b37d404bea7b6e365025cd00779e9eca38d", "5f4f3a2c8bd364f29af9772d4b488cc482a238f434a29dfc89192879d4b46456"),
    ("libc6", "2.36-9+deb12u14", "ba4f88f73dbc3ae9055f3c20f4523bfdbaf1ad13ff95e258924f77d20b4fbedf", "758c68b92654747025b48476a45c315bf16df1321224abdd9be672bfd120be45"),
];

/// The image's name, as the tarball's annotations and RepoTags give it.
const IMAGE: &str = "docker.io/kiln/busybox:test";
const TARBALL: &str = "kiln-busybox-oci.tar";

/// The 32 MiB the stand-in's containers are limited to.
const LIMIT: &str = "33554432";

fn sha(d: &[u8]) -> String {
    hex(&Sha256::digest(d))
}

/// A tar of `(path, mode, content or symlink target)`, deterministic.
fn tar(entries: &[(&str, u32, Entry)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, mode, e) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mode(*mode);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_cksum();
                b.append_data(&mut h, path, &[][..]).unwrap();
            }
            Entry::File(data) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_cksum();
                b.append_data(&mut h, path, &data[..]).unwrap();
            }
            Entry::Link(target) => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_size(0);
                b.append_link(&mut h, path, target).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

enum Entry {
    Dir,
    File(Vec<u8>),
    Link(&'static str),
}

/// An image tarball from a static busybox, in the OCI image layout
/// (`oci-layout`, `index.json`, `blobs/sha256/…`) with docker's
/// `manifest.json` beside it, as `docker save` writes since Docker 25: both
/// `ctr images import` and `docker load` take it.
fn oci_busybox(busybox: Vec<u8>, arch: Arch) -> Vec<u8> {
    const APPLETS: [&str; 9] = ["sh", "echo", "cat", "ls", "cut", "readlink", "yes", "head", "sleep"];
    let mut layer_entries: Vec<(&str, u32, Entry)> = vec![("bin", 0o755, Entry::Dir), ("bin/busybox", 0o755, Entry::File(busybox))];
    let links: Vec<String> = APPLETS.iter().map(|a| format!("bin/{a}")).collect();
    for l in &links {
        layer_entries.push((l, 0o777, Entry::Link("busybox")));
    }
    for d in ["dev", "etc", "proc", "sys", "tmp"] {
        layer_entries.push((d, 0o755, Entry::Dir));
    }
    let layer = tar(&layer_entries);
    let (architecture, variant) = match arch {
        Arch::Amd64 => ("amd64", None),
        Arch::Arm64 => ("arm64", None),
        Arch::Armv7 => ("arm", Some("v7")),
    };
    let mut platform = serde_json::json!({ "architecture": architecture, "os": "linux" });
    if let Some(v) = variant {
        platform["variant"] = v.into();
    }
    let mut config = platform.clone();
    config["config"] = serde_json::json!({ "Env": ["PATH=/bin"], "Cmd": ["sh"] });
    config["rootfs"] = serde_json::json!({ "type": "layers", "diff_ids": [format!("sha256:{}", sha(&layer))] });
    config["history"] = serde_json::json!([{ "created_by": "kiln qemu-tests: a static busybox and its applet links" }]);
    let config = serde_json::to_vec(&config).unwrap();
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{}", sha(&config)), "size": config.len() },
        "layers": [{ "mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{}", sha(&layer)), "size": layer.len() }],
    }))
    .unwrap();
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{}", sha(&manifest)),
            "size": manifest.len(),
            "platform": platform,
            "annotations": { "io.containerd.image.name": IMAGE, "org.opencontainers.image.ref.name": "test" },
        }],
    }))
    .unwrap();
    let blob = |d: &[u8]| format!("blobs/sha256/{}", sha(d));
    let docker = serde_json::to_vec(&serde_json::json!([{ "Config": blob(&config), "RepoTags": ["kiln/busybox:test"], "Layers": [blob(&layer)] }])).unwrap();
    let (bc, bl, bm) = (blob(&config), blob(&layer), blob(&manifest));
    tar(&[
        ("blobs", 0o755, Entry::Dir),
        ("blobs/sha256", 0o755, Entry::Dir),
        (&bc, 0o644, Entry::File(config.clone())),
        (&bl, 0o644, Entry::File(layer.clone())),
        (&bm, 0o644, Entry::File(manifest.clone())),
        ("index.json", 0o644, Entry::File(index)),
        ("manifest.json", 0o644, Entry::File(docker)),
        ("oci-layout", 0o644, Entry::File(br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec())),
    ])
}

/// Writes the worker profile for `arch` (extending the QEMU profile) with
/// the packages in `packages`, and the busybox image tarball; returns the
/// profile's path.
fn profile(arch: Arch, packages: &[(&str, &str, &str, &str)], tag: &str) -> PathBuf {
    let ws = workspace();
    let (base, output) = match arch {
        Arch::Armv7 => ("qemu-armv7", "sdcard"),
        _ => ("qemu-amd64", "disk"),
    };
    let dir = scratch().join(format!("containers-{base}{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // Outside profiles/: kernel-configs/ is found through this.
    std::env::set_var("KILN_SOURCE_DIR", &ws);
    let base_path = ws.join(format!("profiles/{base}.toml"));
    let p = kiln::profile::load(&base_path).unwrap_or_else(|e| panic!("{e}"));
    let cache = kiln::inputs::cache::Cache::default_location();
    let busybox = kiln::inputs::input::resolve("rootfs.busybox", &p.busybox, arch.debian(), &cache).unwrap_or_else(|e| panic!("{e}"));
    let image = oci_busybox(std::fs::read(&busybox.path).unwrap(), arch);
    std::fs::write(dir.join(TARBALL), &image).unwrap();
    let mut text = format!(
        "extends = \"{}\"\nname = \"{base}-containers\"\noutputs = [\"{output}\"]\n\n[disk]\nroot_slot_mib = 256\n\n[node]\nconfig = \"{}\"\n\n[appliance.images]\n\"{TARBALL}\" = {{ file = \"{TARBALL}\", sha256 = \"{}\" }}\n",
        base_path.display(),
        ws.join("profiles/nodes/single.toml").display(),
        sha(&image)
    );
    for (deb, version, amd64, armhf) in packages {
        let pin = if arch == Arch::Armv7 { armhf } else { amd64 };
        text.push_str(&format!("\n[[rootfs.packages]]\ndeb = \"{deb}\"\nversion = \"{version}\"\nsha256 = \"{pin}\"\n"));
        if *deb == "containerd" {
            // Only containerd, ctr and the runc v2 shim are used.
            text.push_str("exclude = [\"usr/share/**\", \"usr/bin/containerd-stress\", \"usr/bin/containerd-shim\", \"usr/bin/containerd-shim-runc-v1\"]\n");
        }
    }
    let path = dir.join("containers.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A worker, as k0s would be told to join (the stand-in only tries to).
fn worker_config(hostname: &str) -> String {
    let kubeconfig = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: Y2E=\n    server: https://10.0.2.2:6443\n  name: k0s\ncontexts:\n- context:\n    cluster: k0s\n    user: kubelet-bootstrap\n  name: k0s\ncurrent-context: k0s\nkind: Config\nusers:\n- name: kubelet-bootstrap\n  user:\n    token: abcdef.0123456789abcdef\n";
    format!("role = \"worker\"\nhostname = \"{hostname}\"\n[k0s]\ntoken = \"{}\"\n", kiln::tools::cluster::join_token(kubeconfig))
}

/// Boots the worker and checks every step of the container exercise.
fn runs_containers(arch: Arch, test: &str) {
    let path = profile(arch, &PACKAGES, "");
    let out = common::built(path.to_str().unwrap());
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    let listed = m.to_string();
    for (deb, version, _, _) in PACKAGES {
        assert!(listed.contains(deb) && listed.contains(version), "the manifest lists {deb} {version}");
    }
    let cfg = worker_config(&test.replace('_', "-"));
    let mut n = boot_with(test, &out, Some(&cfg), move |s| {
        s.boot = BootFrom::Disk;
        if arch == Arch::Armv7 {
            s.disk_size = 2 << 30;
            s.memory_mib = 512;
            s.cpus = 1;
        }
    });
    n.event("payload-started", BOOT_TIMEOUT);
    let long = Duration::from_secs(900);
    n.line("containerd found", BOOT_TIMEOUT, |l| l.contains("stand-in: containerd found at /usr/bin/containerd"));
    n.line("containerd's state under the data dir", BOOT_TIMEOUT, |l| l.contains("stand-in: containerd pid=") && l.contains("root=/var/lib/k0s/containerd"));
    let done = n.line("the container checks", long, |l| l.contains("stand-in: check container-oom-kill ") || l.contains("stand-in: check containerd FAIL") || l.contains("stand-in: check image-import FAIL"));
    let checks = n.standin_checks();
    let failed: Vec<&String> = checks.iter().filter(|l| l.contains(" FAIL")).collect();
    if !failed.is_empty() {
        n.fail(format!("failed checks: {failed:#?} (last: {done})"));
    }
    for c in ["containerd", "image-import", "container-run", "container-netns", "container-memory-limit", "container-oom-kill"] {
        assert!(checks.iter().any(|l| l.ends_with(&format!("check {c} ok"))), "check {c}: {checks:#?}");
    }
    let log = n.vm.log().join("\n");
    assert!(log.contains(&format!("container image-imported file=/var/lib/k0s/images/{TARBALL}")), "the tarball was imported from /var/lib/k0s/images");
    assert!(log.contains(&format!("container images {IMAGE}")), "containerd names the image {IMAGE}");
    let hello = log.lines().find(|l| l.contains("stand-in: container kiln-hello image=")).unwrap_or_default().to_string();
    assert!(hello.contains("exit=0") && hello.contains("kiln-container-hello") && hello.contains("ifaces=lo") && hello.contains("cgroup=/k8s.io/kiln-hello"), "{hello}");
    assert!(log.contains(&format!("stand-in: container kiln-hello /sys/fs/cgroup/k8s.io/kiln-hello/memory.max={LIMIT}")), "the limit, read from the host");
    let oom = log.lines().find(|l| l.contains("stand-in: oom-killed")).unwrap_or_else(|| n.fail("no oom-killed line"));
    assert!(oom.contains(&format!("container=kiln-oom limit={LIMIT} exit=137 event=/tasks/oom")), "{oom}");
    println!("{test}: {hello}\n{test}: {oom}");
}

#[test]
fn amd64_worker_imports_the_image_and_runs_containers_under_a_memory_limit() {
    runs_containers(Arch::Amd64, "containers_amd64");
}

#[test]
fn armv7_worker_imports_the_image_and_runs_containers_under_a_memory_limit() {
    runs_containers(Arch::Armv7, "containers_armv7");
}

#[test]
fn a_binary_with_a_missing_library_fails_the_build_naming_both() {
    // runc without libseccomp2; the error comes before any compiling, and
    // no output is left behind.
    let without: Vec<_> = PACKAGES.iter().copied().filter(|p| p.0 != "libseccomp2").collect();
    let path = profile(Arch::Amd64, &without, "-missing");
    let out_dir = scratch().join("containers-missing-out");
    let _ = std::fs::remove_dir_all(&out_dir);
    let e = kiln::pipeline::build(&path, &out_dir, &kiln::inputs::cache::Cache::default_location()).map(|o| o.out).expect_err("the build must fail");
    let e = format!("{e:#}");
    assert!(e.contains("/usr/sbin/runc (package runc) needs libseccomp.so.2, which is not in the image"), "{e}");
    assert!(!out_dir.join("qemu-amd64-containers").exists(), "no half-written output: {:?}", common::files(&out_dir));
    let _: &Path = &out_dir;
}
