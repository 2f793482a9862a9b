//! Where the node config comes from. First found wins:
//! QEMU fw_cfg `opt/kiln/node.toml`, then `node.toml` on the ESP (mounted at
//! /boot by stage 1), then the default baked into the image.
//! (The cmdline URL and a KILNCFG volume arrive with the ISO and PXE work.)

use crate::config::{self, NodeConfig};

pub const FW_CFG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/kiln/node.toml/raw";
pub const ESP: &str = "/boot/node.toml";
pub const BAKED: &str = "/etc/kiln/node.toml";

/// The raw text of the first source that exists, and its name. The ESP
/// file counts only when it has a setting: the image ships a commented
/// template there.
pub fn find() -> Option<(String, String)> {
    for (name, path) in [("fw_cfg", FW_CFG), ("esp", ESP), ("image", BAKED)] {
        if let Ok(bytes) = std::fs::read(path) {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            if name == "esp" && only_comments(&text) {
                continue;
            }
            return Some((name.to_string(), text));
        }
    }
    None
}

/// True when a TOML text has no settings: only blank lines and comments.
pub fn only_comments(text: &str) -> bool {
    text.lines().map(|l| l.trim_start_matches('\u{feff}').trim()).all(|l| l.is_empty() || l.starts_with('#'))
}

pub enum Found {
    Valid { source: String, config: Box<NodeConfig>, text: String },
    Invalid { source: String, reason: String, text: String },
    Missing,
}

pub fn load() -> Found {
    match find() {
        None => Found::Missing,
        Some((source, text)) => match config::parse(&text) {
            Ok(c) => Found::Valid { source, config: Box::new(c), text },
            Err(e) => Found::Invalid { reason: e.to_string(), source, text },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::only_comments;

    #[test]
    fn commented_template_counts_as_absent() {
        assert!(only_comments(""));
        assert!(only_comments("# node.toml: uncomment to configure\n\n  # role = \"worker\"\r\n\t\n"));
        assert!(only_comments("\u{feff}# with a BOM\n"));
        assert!(!only_comments("# header\nrole = \"single\"\n"));
        assert!(!only_comments("[network]"));
    }
}
