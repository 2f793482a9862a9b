//! Step 2–4 of the pipeline: every external input (pinned, cached by content)
//! and what is made from them before the image: the kernel (compiled, or a
//! distro package's with its module closure), the node binaries, the
//! payload, Debian packages, appliance content and board overlays.

pub mod appliance;
pub mod board;
pub mod cache;
pub mod distro;
pub mod init;
pub mod input;
pub mod kernel;
pub mod kernel_input;
pub mod packages;
pub mod packed;
pub mod payload;
pub mod rootfiles;
pub mod trust;
