//! The PXE bundle (`pxe/`): `vmlinuz`, `initramfs.cpio.zst` (kiln-init's
//! stage 1 plus the verified root's squashfs and hash tree, so no disk is
//! needed), `boot.ipxe`, and `cmdline` for direct kernel boots.
//!
//! The initramfs is three archives end to end, as the kernel accepts them:
//! stage 1 (the disk's own, already zstd-compressed), a small zstd'd cpio
//! with the root's sizes (`kiln_contract::layout::RAM_ROOT_SIZES`), then, at
//! a 4-byte boundary, a plain cpio of the root squashfs and its hash tree.
//! The squashfs is compressed already; compressing it again would cost the
//! build most of its time for nothing. Stage 1 comes first so that a node
//! with too little RAM for the root still runs it, and says how much RAM
//! the root needs.
//!
//! The node fetches its config from `kiln.config=…/configs/${mac}.toml`,
//! where `${kiln-server}` is the HTTP server holding this directory:
//! `kiln serve` rewrites the `set kiln-server` line with its own address.

use crate::image::disk::RootImage;
use kiln_formats::cpio;
use kiln_formats::tree::Tree;
use anyhow::{Context, Result};
use kiln_contract::layout::{RAM_ROOT, RAM_ROOT_SIZES, RAM_VERITY};
use kiln_contract::pxe::RamRoot;
use std::io::Write;
use std::path::Path;

/// The root's sizes beside the initramfs (the same text as in it), for
/// `kiln run` and for operators: the RAM a node needs follows from them.
pub const SIZES_FILE: &str = "pxe/root.sizes";

/// The line `kiln serve` rewrites; behind another server, edit it.
pub const SERVER_LINE: &str = "set kiln-server http://${next-server}:8080";

pub fn ipxe_script(profile: &str, cmdline: &str) -> String {
    format!(
        "#!ipxe\n\
         # kiln PXE bundle for profile {profile}.\n\
         # kiln-server is the HTTP server holding this directory and configs/.\n\
         # `kiln serve` rewrites the next line with its own address; behind any\n\
         # other HTTP server, set it to the URL this directory is served from.\n\
         {SERVER_LINE}\n\
         echo kiln: booting {profile} from ${{kiln-server}} (node config ${{kiln-server}}/configs/${{mac}}.toml)\n\
         kernel ${{kiln-server}}/vmlinuz initrd=initramfs.cpio.zst {cmdline} kiln.config=${{kiln-server}}/configs/${{mac}}.toml\n\
         initrd ${{kiln-server}}/initramfs.cpio.zst\n\
         boot\n"
    )
}

/// Writes the bundle into `dir/pxe/`; returns the initramfs size.
pub fn write(dir: &Path, kernel: &Path, root: &RootImage, epoch: u64, profile: &str) -> Result<u64> {
    let pxe = dir.join("pxe");
    std::fs::create_dir_all(&pxe)?;
    let mut ram = Tree::new();
    ram.host_file(RAM_ROOT, root.squashfs.clone(), 0o444)?;
    ram.host_file(RAM_VERITY, root.verity_path.clone(), 0o444)?;
    let sizes = RamRoot {
        root_bytes: std::fs::metadata(&root.squashfs)?.len(),
        verity_bytes: std::fs::metadata(&root.verity_path)?.len(),
        // An upper bound: the sizes' own archive is well under 4 KiB.
        initramfs_bytes: root.initrd.len() as u64 + 4096 + cpio::newc_len(&ram)?,
    };
    let mut sizes_tree = Tree::new();
    sizes_tree.file(RAM_ROOT_SIZES, sizes.to_file(), 0o444)?;
    let initramfs = pxe.join("initramfs.cpio.zst");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&initramfs)?);
        let mut counted = Counted { inner: &mut f, n: 0 };
        counted.write_all(&root.initrd)?;
        cpio::write(&sizes_tree, epoch, &mut counted).context("writing the PXE initramfs (the root's sizes)")?;
        let pad = (4 - counted.n % 4) % 4;
        counted.write_all(&[0u8; 3][..pad as usize])?;
        cpio::write_cpio(&ram, epoch, &mut counted).context("writing the PXE initramfs (the root)")?;
        f.flush()?;
    }
    std::fs::write(dir.join(SIZES_FILE), sizes.to_file())?;
    std::fs::copy(kernel, pxe.join("vmlinuz"))?;
    std::fs::write(pxe.join("boot.ipxe"), ipxe_script(profile, &root.cmdline))?;
    std::fs::write(pxe.join("cmdline"), format!("{}\n", root.cmdline))?;
    Ok(std::fs::metadata(&initramfs)?.len())
}

/// Counts what goes through, for the 4-byte boundary between the archives.
struct Counted<'a, W: Write> {
    inner: &'a mut W,
    n: u64,
}

impl<W: Write> Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k as u64;
        Ok(k)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}
