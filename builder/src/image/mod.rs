//! Steps 5–8: the root and boot artifacts laid out as outputs: the GPT disk
//! image, the hybrid ISO and its install image, the SD card, the PXE
//! bundle, the update bundle, and Secure Boot signing.

pub mod disk;
pub mod install;
pub mod isoboot;
pub mod pxe;
pub mod sdcard;
pub mod secureboot;
pub mod update;
