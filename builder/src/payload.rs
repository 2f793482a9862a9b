//! The payload: real k0s from a pinned input, or the stand-in test fixture
//! built from qemu-tests/.

use crate::cache::Cache;
use crate::init::{self, BinaryError};
use crate::input::{self, InputError, Resolved};
use crate::profile::{Payload as Spec, Profile};
use std::path::PathBuf;

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

pub fn build(profile: &Profile, cache: &Cache) -> Result<Payload, PayloadError> {
    match &profile.payload {
        Spec::StandIn => {
            let path = init::cargo_build(&profile.tree, STAND_IN_PACKAGE, "k0s", profile.arch)?;
            Ok(Payload { path, description: "stand-in (kiln test fixture, not k0s)".into(), version: "stand-in".into(), input: None })
        }
        Spec::K0s { input: spec, version } => {
            let r = input::resolve("payload.k0s", spec, profile.arch.debian(), cache)?;
            init::check_static("payload.k0s", &r.path, profile.arch)?;
            Ok(Payload { path: r.path.clone(), description: "k0s".into(), version: version.clone().unwrap_or_else(|| "unknown".into()), input: Some(r) })
        }
    }
}
