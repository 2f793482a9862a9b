//! A/B updates, node side: applying a verified bundle to the other slot
//! ([`apply`]), the update channel ([`channel`]) and a u-boot card's state
//! file ([`uboot`]). The bundle format, its signature check and image
//! versions are `kiln_contract::update`; `node::updates` decides when.

#[cfg(target_os = "linux")]
pub mod apply;
#[cfg(target_os = "linux")]
pub mod channel;
#[cfg(target_os = "linux")]
pub mod uboot;
