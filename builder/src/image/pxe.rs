//! The PXE bundle (`pxe/`): `vmlinuz`, `initramfs.cpio.zst` (kiln-init's
//! stage 1 plus the verified root's squashfs and hash tree, so no disk is
//! needed), `boot.ipxe`, and `cmdline` for direct kernel boots.
//!
//! The initramfs is two zstd frames end to end, as the kernel and `zstd
//! -d` read them: stage 1 (the disk's own, compressed), then a frame of
//! stored (raw) blocks holding a cpio of the root's sizes
//! (`kiln_contract::layout::RAM_ROOT_SIZES`), the root squashfs and its hash
//! tree. The squashfs is compressed already; compressing it again would
//! cost the build most of its time for nothing. Stage 1 comes first, and
//! the sizes before the root, so that a node with too little RAM for the
//! root still runs stage 1, which says how much RAM the root needs.
//!
//! The node fetches its config from `kiln.config=${kiln-config-server}/
//! configs/${mac}.toml`. `${kiln-server}` is the HTTP server holding this
//! directory; `${kiln-config-server}` is where configs come from, the same
//! server unless it has TLS: `kiln serve` rewrites both lines with its own
//! address, the second as https:// when it serves TLS (iPXE fetches the
//! kernel and initramfs over plain HTTP; the config, which may hold secrets,
//! over HTTPS by kiln-init).

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
/// Where node configs come from; `kiln serve` with TLS sets its https://
/// address here.
pub const CONFIG_SERVER_LINE: &str = "set kiln-config-server ${kiln-server}";

pub fn ipxe_script(profile: &str, cmdline: &str) -> String {
    format!(
        "#!ipxe\n\
         # kiln PXE bundle for profile {profile}.\n\
         # kiln-server is the HTTP server holding this directory and configs/.\n\
         # `kiln serve` rewrites the next line with its own address; behind any\n\
         # other HTTP server, set it to the URL this directory is served from.\n\
         {SERVER_LINE}\n\
         # kiln-config-server serves configs/<mac>.toml: `kiln serve` with TLS\n\
         # sets its https:// address; configs holding secrets need https://.\n\
         {CONFIG_SERVER_LINE}\n\
         echo kiln: booting {profile} from ${{kiln-server}} (node config ${{kiln-config-server}}/configs/${{mac}}.toml)\n\
         kernel ${{kiln-server}}/vmlinuz initrd=initramfs.cpio.zst {cmdline} kiln.config=${{kiln-config-server}}/configs/${{mac}}.toml\n\
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
    let mut sizes = RamRoot {
        root_bytes: std::fs::metadata(&root.squashfs)?.len(),
        verity_bytes: std::fs::metadata(&root.verity_path)?.len(),
        initramfs_bytes: 0,
    };
    // The sizes file's own length depends on this number's digits: take
    // the length with the widest it can be, then pad the number to it.
    ram.file(RAM_ROOT_SIZES, RamRoot { initramfs_bytes: u64::MAX, ..sizes }.to_file(), 0o444)?;
    let total = root.initrd.len() as u64 + cpio::stored_len(cpio::newc_len(&ram)?);
    sizes.initramfs_bytes = total;
    let text = sizes.to_file().replace(&format!("initramfs_bytes={total}"), &format!("initramfs_bytes={total:0>20}"));
    ram.file(RAM_ROOT_SIZES, text, 0o444)?;
    let initramfs = pxe.join("initramfs.cpio.zst");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&initramfs)?);
        f.write_all(&root.initrd)?;
        cpio::write_stored(&ram, epoch, &mut f).context("writing the PXE initramfs (the root)")?;
        f.flush()?;
    }
    let written = std::fs::metadata(&initramfs)?.len();
    if written != total {
        anyhow::bail!("the PXE initramfs is {written} bytes, not the {total} its sizes file says (a kiln bug)");
    }
    std::fs::write(dir.join(SIZES_FILE), sizes.to_file())?;
    std::fs::copy(kernel, pxe.join("vmlinuz"))?;
    std::fs::write(pxe.join("boot.ipxe"), ipxe_script(profile, &root.cmdline))?;
    std::fs::write(pxe.join("cmdline"), format!("{}\n", root.cmdline))?;
    Ok(written)
}
