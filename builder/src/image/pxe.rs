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
//! By default (`pxe.config = "per-mac"`) the node fetches its config from
//! `kiln.config=${kiln-config-server}/configs/${mac}.toml`. `${kiln-server}`
//! is the HTTP server holding this directory (`pxe.server`, by default
//! `http://${next-server}:8080`); `${kiln-config-server}` is where configs
//! come from, the same server unless it has TLS: `kiln serve` rewrites both
//! lines with its own address, the second as https:// when it serves TLS
//! (iPXE fetches the kernel and initramfs over plain HTTP; the config, which
//! may hold secrets, over HTTPS by kiln-init). `pxe.config = "image"` boots
//! without `kiln.config=`, so the node uses the config baked into the image
//! (or a KILNCFG stick); a URL gives every node that one config.

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

/// Where boot.ipxe finds the bundle when `pxe.server` is not set.
pub const DEFAULT_SERVER: &str = "http://${next-server}:8080";
/// Where node configs come from; `kiln serve` with TLS sets its https://
/// address here.
pub const CONFIG_SERVER_LINE: &str = "set kiln-config-server ${kiln-server}";

/// `[pxe]`: where boot.ipxe sends iPXE and the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PxeSpec {
    /// The URL `pxe/` is served from (`pxe.server`), no trailing slash.
    pub server: String,
    pub config: PxeConfig,
}

/// Where a PXE-booted node's config comes from (`pxe.config`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PxeConfig {
    /// `per-mac`: `configs/<mac>.toml` beside the bundle (the default).
    PerMac,
    /// `image`: no `kiln.config=`; the image's own node.toml (or a KILNCFG
    /// stick, fw_cfg) as on a disk boot.
    Image,
    /// One URL for every node.
    Url(String),
}

impl Default for PxeSpec {
    fn default() -> PxeSpec {
        PxeSpec { server: DEFAULT_SERVER.into(), config: PxeConfig::PerMac }
    }
}

/// A URL iPXE and the kernel command line can carry: http:// or https://,
/// no spaces or quotes (`${…}` iPXE settings allowed).
fn check_url(u: &str) -> Result<String, String> {
    let rest = u.strip_prefix("http://").or_else(|| u.strip_prefix("https://")).ok_or_else(|| format!("`{u}` is not an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(format!("`{u}` has no host"));
    }
    if let Some(c) = u.chars().find(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | '\'' | '\\')) {
        return Err(format!("`{u}` holds {c:?}, which a kernel command line cannot carry"));
    }
    Ok(u.trim_end_matches('/').to_string())
}

impl PxeSpec {
    /// From the profile's `pxe.server` and `pxe.config`; an error names
    /// the key.
    pub fn from_keys(server: Option<&str>, config: Option<&str>) -> Result<PxeSpec, (&'static str, String)> {
        let server = match server {
            Some(s) => check_url(s).map_err(|m| ("pxe.server", format!("{m}; give the URL the pxe/ directory is served from, e.g. \"http://10.0.0.1:8080\" or \"http://${{next-server}}/kiln/pxe\"")))?,
            None => DEFAULT_SERVER.into(),
        };
        let config = match config {
            None | Some("per-mac") => PxeConfig::PerMac,
            Some("image") => PxeConfig::Image,
            Some(u) => PxeConfig::Url(check_url(u).map_err(|m| ("pxe.config", format!("{m}; give \"per-mac\", \"image\" or the config's URL")))?),
        };
        Ok(PxeSpec { server, config })
    }
}

pub fn ipxe_script(profile: &str, cmdline: &str, spec: &PxeSpec) -> String {
    let server = &spec.server;
    let (config_lines, echo, arg) = match &spec.config {
        PxeConfig::PerMac => (
            format!(
                "# kiln-config-server serves configs/<mac>.toml: `kiln serve` with TLS\n\
                 # sets its https:// address; configs holding secrets need https://.\n\
                 {CONFIG_SERVER_LINE}\n"
            ),
            "node config ${kiln-config-server}/configs/${mac}.toml".to_string(),
            " kiln.config=${kiln-config-server}/configs/${mac}.toml".to_string(),
        ),
        PxeConfig::Url(u) => (String::new(), format!("node config {u}"), format!(" kiln.config={u}")),
        PxeConfig::Image => ("# pxe.config = \"image\": the node uses the config baked into the image.\n".to_string(), "the image's node config".to_string(), String::new()),
    };
    format!(
        "#!ipxe\n\
         # kiln PXE bundle for profile {profile}.\n\
         # kiln-server is the HTTP server holding this directory and configs/.\n\
         # `kiln serve` rewrites the next line with its own address; behind any\n\
         # other HTTP server, set it to the URL this directory is served from\n\
         # (or build with pxe.server in the profile).\n\
         set kiln-server {server}\n\
         {config_lines}\
         echo kiln: booting {profile} from ${{kiln-server}} ({echo})\n\
         kernel ${{kiln-server}}/vmlinuz initrd=initramfs.cpio.zst {cmdline}{arg}\n\
         initrd ${{kiln-server}}/initramfs.cpio.zst\n\
         boot\n"
    )
}

/// Writes the bundle into `dir/pxe/`; returns the initramfs size.
pub fn write(dir: &Path, kernel: &Path, root: &RootImage, epoch: u64, profile: &str, spec: &PxeSpec) -> Result<u64> {
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
    std::fs::write(pxe.join("boot.ipxe"), ipxe_script(profile, &root.cmdline, spec))?;
    std::fs::write(pxe.join("cmdline"), format!("{}\n", root.cmdline))?;
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pxe_keys_are_checked_and_shape_boot_ipxe() {
        let d = PxeSpec::from_keys(None, None).unwrap();
        assert_eq!(d, PxeSpec::default());
        let s = ipxe_script("p", "console=ttyS0", &d);
        assert!(s.contains("set kiln-server http://${next-server}:8080\n"), "{s}");
        assert!(s.contains(CONFIG_SERVER_LINE), "{s}");
        assert!(s.contains("console=ttyS0 kiln.config=${kiln-config-server}/configs/${mac}.toml\n"), "{s}");

        let img = PxeSpec::from_keys(Some("http://boot.lan/kiln/pxe/"), Some("image")).unwrap();
        assert_eq!(img.server, "http://boot.lan/kiln/pxe");
        let s = ipxe_script("p", "console=ttyS0", &img);
        assert!(s.contains("set kiln-server http://boot.lan/kiln/pxe\n"), "{s}");
        assert!(!s.contains("kiln.config=") && !s.contains(CONFIG_SERVER_LINE), "{s}");
        assert!(s.contains("initrd=initramfs.cpio.zst console=ttyS0\n"), "{s}");

        let one = PxeSpec::from_keys(None, Some("https://cfg.lan/worker.toml")).unwrap();
        let s = ipxe_script("p", "x", &one);
        assert!(s.contains(" kiln.config=https://cfg.lan/worker.toml\n"), "{s}");

        for (server, config, key) in [
            (Some("ftp://x"), None, "pxe.server"),
            (Some("http://"), None, "pxe.server"),
            (Some("http://a b"), None, "pxe.server"),
            (None, Some("per_mac"), "pxe.config"),
            (None, Some("https://x/\"y"), "pxe.config"),
        ] {
            let e = PxeSpec::from_keys(server, config).unwrap_err();
            assert_eq!(e.0, key, "{server:?} {config:?}: {e:?}");
        }
    }
}
