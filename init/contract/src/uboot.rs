//! The A/B state of u-boot boards, shared by the builder (which writes the
//! first one) and the node (which marks boots good and installs trials;
//! `kiln_init::node::update::uboot` reads and writes the file).
//!
//! The boot FAT holds `/kiln/state`, which `/boot.scr` reads with u-boot's
//! `env import -t` and writes back with `env export -t` and `fatwrite`:
//!
//! ```text
//! kiln_good=a        # the slot to boot when nothing is on trial
//! kiln_try=b         # a slot on trial (`-` when none)
//! kiln_tries=2       # boots it has left; boot.scr takes one per boot
//! ```
//!
//! u-boot's export ends the text with a NUL, and may order the lines its
//! own way; the parser takes either. Each slot boots `/kiln/<x>/extlinux.conf`.
//!
//! The file always has the same length (37 bytes: one digit of tries, `-`
//! for no trial, a closing NUL as u-boot writes it), so kiln-init rewrites
//! it in place: one sector, with the FAT's directory entry and cluster chain
//! untouched. A power cut then leaves either the old or the new state,
//! never a missing file (which a rename on FAT could).

use crate::layout::Slot;

/// The state file on the boot FAT, relative to its root.
pub const STATE: &str = "kiln/state";

/// A slot's directory on the boot FAT, relative to its root: `kiln/a`.
pub fn slot_dir(slot: Slot) -> String {
    format!("kiln/{slot}")
}

/// File names inside a slot's directory.
pub const KERNEL: &str = "zImage";
pub const INITRD: &str = "initramfs.cpio.zst";
pub const DTB_DIR: &str = "dtbs";
pub const EXTLINUX: &str = "extlinux.conf";

/// What `/kiln/state` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct State {
    pub good: Slot,
    /// The slot on trial and the boots it has left.
    pub trial: Option<(Slot, u32)>,
}

fn slot_of(v: &str) -> Option<Slot> {
    match v.trim() {
        "a" => Some(Slot::A),
        "b" => Some(Slot::B),
        _ => None,
    }
}

impl State {
    /// A freshly written card: slot a, good, nothing on trial.
    pub fn initial() -> State {
        State { good: Slot::A, trial: None }
    }

    /// Parses the file; None when it names no good slot.
    pub fn parse(text: &str) -> Option<State> {
        let (mut good, mut try_, mut tries) = (None, None, 0u32);
        for line in text.split(['\n', '\0']) {
            match line.trim().split_once('=') {
                Some(("kiln_good", v)) => good = slot_of(v),
                Some(("kiln_try", v)) => try_ = slot_of(v),
                // Tries are one digit; older boot.scr counted with setexpr,
                // which writes hex.
                Some(("kiln_tries", v)) => tries = u32::from_str_radix(v.trim().trim_start_matches("0x"), 16).unwrap_or(0),
                _ => {}
            }
        }
        Some(State { good: good?, trial: try_.filter(|t| Some(*t) != good).map(|t| (t, tries)) })
    }

    /// The file's bytes: always [`STATE_LEN`] long (tries are capped at 9,
    /// as node.toml's `update.tries` is).
    pub fn to_text(&self) -> String {
        let (t, n) = match self.trial {
            None => ("-", 0),
            Some((t, n)) => (t.letter(), n.min(9)),
        };
        format!("kiln_good={}\nkiln_try={t}\nkiln_tries={n}\n\0", self.good)
    }
}

/// The length of the state file as kiln writes it (and as boot.scr's
/// `env export` writes it back).
pub const STATE_LEN: usize = 37;

/// A slot's extlinux.conf: the kernel, dtb and initramfs in its directory,
/// and `cmdline`.
pub fn extlinux_conf(board: &str, slot: Slot, dtb: Option<&str>, cmdline: &str) -> String {
    let dir = format!("/{}", slot_dir(slot));
    let mut s = format!("# Written by kiln for the {board} board, slot {slot}; /boot.scr boots it.\ndefault kiln\ntimeout 0\n\nlabel kiln\n    kernel {dir}/{KERNEL}\n");
    if let Some(d) = dtb {
        s.push_str(&format!("    fdt {dir}/{DTB_DIR}/{d}\n"));
    }
    s.push_str(&format!("    initrd {dir}/{INITRD}\n    append {cmdline}\n"));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_and_reads_what_uboot_writes() {
        for s in [State::initial(), State { good: Slot::A, trial: Some((Slot::B, 3)) }, State { good: Slot::B, trial: None }] {
            assert_eq!(State::parse(&s.to_text()), Some(s));
            assert_eq!(s.to_text().len(), STATE_LEN);
        }
        // What `env export -t` writes for the same variables has the same
        // length, so kiln-init's next write is in place again.
        assert_eq!("kiln_good=a\nkiln_tries=1\nkiln_try=b\n\0".len(), STATE_LEN);
        // `env export -t` after two boots of a trial: its own order, a NUL.
        assert_eq!(State::parse("kiln_good=a\nkiln_tries=0\nkiln_try=b\n\0"), Some(State { good: Slot::A, trial: Some((Slot::B, 0)) }));
        assert_eq!(State::parse("kiln_good=a\nkiln_tries=a\nkiln_try=b\n"), Some(State { good: Slot::A, trial: Some((Slot::B, 10)) }));
        assert_eq!(State::parse("kiln_try=b\n"), None);
        assert_eq!(State::parse("kiln_good=a\nkiln_try=a\nkiln_tries=2\n"), Some(State::initial()));
    }

    #[test]
    fn extlinux_names_the_slot_directory() {
        let c = extlinux_conf("beaglebone-black", Slot::B, Some("am335x-boneblack.dtb"), "roothash=07 quiet");
        assert!(c.contains("label kiln\n    kernel /kiln/b/zImage\n    fdt /kiln/b/dtbs/am335x-boneblack.dtb\n    initrd /kiln/b/initramfs.cpio.zst\n    append roothash=07 quiet\n"), "{c}");
        assert!(!extlinux_conf("t", Slot::A, None, "x").contains("fdt"));
    }
}
