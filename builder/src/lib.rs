//! kiln: builds immutable, signed, bootable k0s node images.
//!
//! One module per pipeline stage, named after what it makes; [`pipeline`]
//! strings them together in the order of ARCHITECTURE.md.

pub mod arch;
pub mod identity;
pub mod image;
pub mod inputs;
pub mod pipeline;
pub mod profile;
pub mod provenance;
pub mod tomlfile;
pub mod tools;
