//! The PXE bundle: `vmlinuz`, `initramfs.cpio.zst`, `boot.ipxe`.
//!
//! iPXE resolves the relative names in the script against the script's own
//! URL, so the directory can be served from anywhere.

use std::path::Path;

pub fn ipxe_script(cmdline: &str) -> String {
    format!("#!ipxe\n# kiln PXE boot. Serve this directory over HTTP and chain this script.\nkernel vmlinuz {cmdline}\ninitrd initramfs.cpio.zst\nboot\n")
}

/// Writes the bundle into `dir/pxe/`.
pub fn write(dir: &Path, kernel: &Path, initramfs: &Path, cmdline: &str) -> std::io::Result<()> {
    let pxe = dir.join("pxe");
    std::fs::create_dir_all(&pxe)?;
    std::fs::copy(kernel, pxe.join("vmlinuz"))?;
    std::fs::copy(initramfs, pxe.join("initramfs.cpio.zst"))?;
    std::fs::write(pxe.join("boot.ipxe"), ipxe_script(cmdline))?;
    std::fs::write(pxe.join("cmdline"), format!("{cmdline}\n"))?;
    Ok(())
}
