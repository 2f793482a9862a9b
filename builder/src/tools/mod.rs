//! The tools beside the build: `kiln run` (QEMU), `kiln serve` (PXE and
//! configs over HTTP) and `kiln cluster` (a new cluster's node configs).

pub mod bench;
pub mod cluster;
pub mod fixture;
pub mod run;
pub mod serve;
pub mod tls;
