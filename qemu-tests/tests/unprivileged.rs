//! The builder needs no root, no loop devices and no mount: build the image
//! as an unprivileged user and get the same bytes as root's build.

mod common;

use std::path::Path;
use std::process::Command;

fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().expect("sh");
    assert!(out.status.success(), "`{cmd}`:\n{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn an_unprivileged_user_builds_the_same_image() {
    let out = common::built("qemu-amd64");
    // SAFETY: plain syscall.
    if unsafe { libc_geteuid() } != 0 {
        eprintln!("already unprivileged: the other tests built the image without root");
        return;
    }
    let ws = common::workspace();
    let kiln = common::kiln_bin();
    let tmp = tempfile::Builder::new().prefix("kiln-nobody").tempdir_in("/tmp").unwrap();
    let t = tmp.path();
    // What the build reads from the cache (inputs and the kernel), and the
    // node binaries root already compiled: nobody cannot use root's toolchain.
    let cache = kiln::inputs::cache::Cache::default_location();
    sh(&format!("mkdir -p {t}/cache {t}/bin && cp -r {c}/sha256 {c}/index {c}/kernel {t}/cache/", t = t.display(), c = cache.root().display()));
    let target = "x86_64-unknown-linux-musl";
    sh(&format!("mkdir -p {t}/bin/{target} && cp {n}/{target}/node/kiln-init {n}/{target}/node/k0s {t}/bin/{target}/", t = t.display(), n = ws.join("target/kiln-node").display()));
    sh(&format!("chmod 755 {t} && chown -R 65534:65534 {t}", t = t.display()));
    let run = format!(
        "setpriv --reuid=65534 --regid=65534 --clear-groups env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME={t} KILN_CACHE_DIR={t}/cache KILN_NODE_BINARIES={t}/bin {kiln} build {p} --out {t}/out 2>&1; echo uid=$(setpriv --reuid=65534 id -u)",
        t = t.display(),
        kiln = kiln.display(),
        p = ws.join("profiles/qemu-amd64.toml").display()
    );
    let text = sh(&run);
    assert!(text.contains("uid=65534") && text.contains("built "), "{text}");
    for f in ["disk.raw", "disk.qcow2", "disk.bmap", "pxe/initramfs.cpio.zst", "pxe/vmlinuz", "manifest.json"] {
        let a = std::fs::read(out.join(f)).unwrap();
        let b = std::fs::read(Path::new(t).join("out/qemu-amd64").join(f)).unwrap();
        assert!(a == b, "{f} differs between root's build and nobody's");
    }
}

extern "C" {
    #[link_name = "geteuid"]
    fn libc_geteuid() -> u32;
}
