//! The payload: real k0s from a pinned input, or the stand-in test fixture
//! built from qemu-tests/.

use crate::inputs::cache::Cache;
use crate::inputs::init::{self, BinaryError};
use crate::inputs::input::{self, InputError, Resolved};
use crate::arch::Arch;
use crate::inputs::input::Input;
use std::path::{Path, PathBuf};

/// `[payload]` as the profile gives it.
#[derive(Debug, Clone)]
pub enum Spec {
    /// The stand-in test fixture (built from qemu-tests/), not k0s.
    StandIn,
    /// Real k0s: a pinned input, and the version it says it is.
    K0s { input: Input, version: Option<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error(transparent)]
    Binary(#[from] BinaryError),
}

#[derive(Debug, Clone)]
pub struct Payload {
    pub path: PathBuf,
    /// What the manifest calls it: `k0s` or `stand-in (test fixture, not k0s)`.
    pub description: String,
    pub version: String,
    pub input: Option<Resolved>,
}

/// The workspace package the stand-in is built from (binary `k0s`).
pub const STAND_IN_PACKAGE: &str = "kiln-qemu-tests";

/// The payload of `spec` for `arch`; the stand-in is built from the kiln
/// source `tree`.
pub fn build(spec: &Spec, tree: &Path, arch: Arch, cache: &Cache) -> Result<Payload, PayloadError> {
    match spec {
        Spec::StandIn => {
            let path = init::cargo_build(tree, STAND_IN_PACKAGE, "k0s", arch)?;
            Ok(Payload { path, description: "stand-in (kiln test fixture, not k0s)".into(), version: "stand-in".into(), input: None })
        }
        Spec::K0s { input: spec, version } => {
            let r = input::resolve("payload.k0s", spec, arch.debian(), cache)?;
            init::check_static("payload.k0s", &r.path, arch)?;
            Ok(Payload { path: r.path.clone(), description: "k0s".into(), version: version.clone().unwrap_or_else(|| "unknown".into()), input: Some(r) })
        }
    }
}
