//! Where the node config comes from. First found wins:
//! QEMU fw_cfg `opt/kiln/node.toml`, then the default baked into the image.
//! (The cmdline URL, a KILNCFG volume and the ESP file arrive with the disk,
//! ISO and PXE work.)

use crate::config::{self, NodeConfig};

pub const FW_CFG: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/kiln/node.toml/raw";
pub const BAKED: &str = "/etc/kiln/node.toml";

/// The raw text of the first source that exists, and its name.
pub fn find() -> Option<(String, String)> {
    for (name, path) in [("fw_cfg", FW_CFG), ("image", BAKED)] {
        if let Ok(bytes) = std::fs::read(path) {
            return Some((name.to_string(), String::from_utf8_lossy(&bytes).into_owned()));
        }
    }
    None
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
