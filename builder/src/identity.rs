//! What an image is, as its outputs name it (manifest, SBOM, update
//! bundle): the narrow view of a profile that the stages describing a build
//! take, so that no stage needs the whole `Profile`.

use crate::arch::Arch;
use std::path::Path;

#[derive(Debug, Clone, Copy)]
pub struct Identity<'a> {
    /// The profile file, for messages.
    pub profile: &'a Path,
    pub name: &'a str,
    pub description: &'a str,
    pub arch: Arch,
    /// `version`, when the profile has one.
    pub version: Option<&'a str>,
    /// The armv7 board overlay's name, for board images.
    pub board: Option<&'a str>,
    pub source_date_epoch: u64,
    /// The kiln source tree (Cargo.lock, the node binaries' crates).
    pub tree: &'a Path,
}
