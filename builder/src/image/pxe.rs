//! The PXE bundle (`pxe/`): `vmlinuz`, `initramfs.cpio.zst` (kiln-init's
//! stage 1 plus the verified root's squashfs and hash tree, so no disk is
//! needed), `boot.ipxe`, and `cmdline` for direct kernel boots.
//!
//! The node fetches its config from `kiln.config=…/configs/${mac}.toml`,
//! where `${kiln-server}` is the HTTP server holding this directory:
//! `kiln serve` rewrites the `set kiln-server` line with its own address.

use crate::image::disk::RootImage;
use kiln_formats::cpio;
use kiln_formats::tree::Tree;
use anyhow::{Context, Result};
use kiln_contract::layout::{RAM_ROOT, RAM_VERITY};
use std::path::Path;

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
pub fn write(dir: &Path, kernel: &Path, stage1: &Tree, root: &RootImage, epoch: u64, profile: &str) -> Result<u64> {
    let pxe = dir.join("pxe");
    std::fs::create_dir_all(&pxe)?;
    let mut t = stage1.clone();
    t.mkdir_p("/kiln", 0o755)?;
    t.host_file(RAM_ROOT, root.squashfs.clone(), 0o444)?;
    t.host_file(RAM_VERITY, root.verity_path.clone(), 0o444)?;
    let initramfs = pxe.join("initramfs.cpio.zst");
    {
        let f = std::fs::File::create(&initramfs)?;
        cpio::write(&t, epoch, std::io::BufWriter::new(f)).context("writing the PXE initramfs")?;
    }
    std::fs::copy(kernel, pxe.join("vmlinuz"))?;
    std::fs::write(pxe.join("boot.ipxe"), ipxe_script(profile, &root.cmdline))?;
    std::fs::write(pxe.join("cmdline"), format!("{}\n", root.cmdline))?;
    Ok(std::fs::metadata(&initramfs)?.len())
}
