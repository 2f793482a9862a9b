//! What a build says about itself: the manifest, the SPDX SBOM (with the
//! node binaries' crates), signing keys and signatures, and `kiln verify`.

pub mod crates;
pub mod keys;
pub mod manifest;
pub mod sbom;
pub mod sign;
pub mod verify;
