//! kiln: builds immutable, signed, bootable k0s node images.
//!
//! [`pipeline`] is the build as one function, in the order of
//! ARCHITECTURE.md; each stage is a module named after what it makes, in a
//! folder for its part of the pipeline:
//! - [`profile`]: step 1, the profile (errors with file, line and key:
//!   [`tomlfile`]); [`arch`], and [`identity`], the narrow view of a profile
//!   that the stages describing a build take;
//! - [`inputs`]: pinned inputs and the cache, the kernel, the node binaries,
//!   the payload, Debian packages, appliance content, board overlays;
//! - [`image`]: the outputs: disk, ISO and install image, SD card, PXE,
//!   update bundle, Secure Boot signing;
//! - [`provenance`]: manifest, SBOM, keys and signatures, `kiln verify`;
//! - [`tools`]: beside the build: `kiln run`, `kiln serve`, `kiln cluster`.
//!
//! The formats themselves (GPT, FAT, ISO, squashfs, …) are the crate
//! `kiln_formats`; what the image and the node agree on is
//! `kiln_contract`.

pub mod arch;
pub mod identity;
pub mod image;
pub mod inputs;
pub mod pipeline;
pub mod progress;
pub mod profile;
pub mod provenance;
pub mod tomlfile;
pub mod tools;
