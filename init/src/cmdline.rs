//! The kernel command line: kiln's words on it, read the way the kernel
//! splits them. Stage 1's settings (`roothash=`, `kiln.slot=`,
//! `kiln.verity=`, `kiln.root=`, `kiln.mbr=`) are parsed here; the other
//! `kiln.*` words are read with [`words`] by the module that acts on them.

use kiln_contract::digest::{hex, unhex32};

/// What the kernel reacts with when a root block does not match its hash.
/// Without one, the read fails with EIO.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnCorruption {
    Panic,
    Restart,
}

impl OnCorruption {
    pub fn table_arg(self) -> &'static str {
        match self {
            OnCorruption::Panic => "panic_on_corruption",
            OnCorruption::Restart => "restart_on_corruption",
        }
    }
}

/// Stage 1's part of the cmdline:
/// `roothash=<64 hex> [kiln.slot=a|b] [kiln.verity=panic|restart]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cmdline {
    pub roothash: [u8; 32],
    pub slot: String,
    pub on_corruption: Option<OnCorruption>,
    /// `kiln.root=ram`: copy the root into RAM before verifying it, so the
    /// boot medium (a CD or stick) can be removed.
    pub ram: bool,
    /// `kiln.mbr=…`: where the root is on an MBR card.
    pub mbr: Option<MbrRoot>,
}

/// `kiln.mbr=<disk signature>,<partition>,<hash offset>`: an MBR card has no
/// partition UUIDs, so the builder names the root slot: primary partition
/// `partition` of the disk with that signature (8 hex digits, as in
/// PARTUUID=SSSSSSSS-PP), holding the squashfs and, `hash_offset` bytes in,
/// its verity tree. The root hash still decides whether it is the right root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MbrRoot {
    pub signature: u32,
    pub partition: u32,
    pub hash_offset: u64,
}

pub fn parse_mbr(v: &str) -> Result<MbrRoot, String> {
    let bad = || format!("kiln.mbr={v:?} on the kernel cmdline: write <disk signature in 8 hex digits>,<partition 1-4>,<verity offset in bytes>, as the builder does (rebuild or reflash the image)");
    let f: Vec<&str> = v.split(',').collect();
    let [sig, part, off] = f[..] else { return Err(bad()) };
    let signature = u32::from_str_radix(sig, 16).ok().filter(|s| sig.len() == 8 && *s != 0).ok_or_else(bad)?;
    let partition = part.parse().ok().filter(|p| (1..=4).contains(p)).ok_or_else(bad)?;
    let hash_offset = off.parse().ok().filter(|o| *o > 0 && o % 4096 == 0).ok_or_else(bad)?;
    Ok(MbrRoot { signature, partition, hash_offset })
}

impl Cmdline {
    pub fn root_hex(&self) -> String {
        hex(&self.roothash)
    }
}

/// Splits a cmdline into words, honouring double quotes as the kernel does.
pub fn words(cmdline: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut any = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                any = true;
            }
            c if c.is_whitespace() && !quoted => {
                if any {
                    out.push(std::mem::take(&mut cur));
                    any = false;
                }
            }
            c => {
                cur.push(c);
                any = true;
            }
        }
    }
    if any {
        out.push(cur);
    }
    out
}

/// True when the cmdline asks for a verified root (stage 1 has work).
pub fn has_roothash(cmdline: &str) -> bool {
    words(cmdline).iter().any(|w| w.starts_with("roothash="))
}

/// Parses stage 1's settings; the last of a repeated key wins, as in the
/// kernel. Every error says what is wrong and what to do.
pub fn parse_cmdline(cmdline: &str) -> Result<Cmdline, String> {
    let (mut hash, mut slot, mut verity, mut root, mut mbr) = (None, None, None, None, None);
    for w in words(cmdline) {
        if let Some(v) = w.strip_prefix("kiln.root=") {
            root = Some(v.to_string());
        }
        if let Some(v) = w.strip_prefix("roothash=") {
            hash = Some(v.to_string());
        } else if let Some(v) = w.strip_prefix("kiln.slot=") {
            slot = Some(v.to_string());
        } else if let Some(v) = w.strip_prefix("kiln.verity=") {
            verity = Some(v.to_string());
        } else if let Some(v) = w.strip_prefix("kiln.mbr=") {
            mbr = Some(v.to_string());
        }
    }
    let hash = hash.ok_or("no roothash= on the kernel cmdline; a disk image's boot entry must carry the root hash")?;
    let roothash = unhex32(&hash).ok_or_else(|| {
        format!("roothash={hash:?} on the kernel cmdline is not a sha256 root hash (64 hex digits); the boot entry's cmdline is damaged or was edited: rebuild or reflash the image")
    })?;
    let slot = slot.unwrap_or_else(|| "a".into());
    if slot != "a" && slot != "b" {
        return Err(format!("kiln.slot={slot:?} on the kernel cmdline: use a or b"));
    }
    let on_corruption = match verity.as_deref() {
        None => None,
        Some("panic") => Some(OnCorruption::Panic),
        Some("restart") => Some(OnCorruption::Restart),
        Some(v) => return Err(format!("kiln.verity={v:?} on the kernel cmdline: use panic or restart, or leave it out (a bad block is then a read error)")),
    };
    let ram = match root.as_deref() {
        None | Some("medium") => false,
        Some("ram") => true,
        Some(v) => return Err(format!("kiln.root={v:?} on the kernel cmdline: use ram (copy the root into RAM) or medium, or leave it out")),
    };
    let mbr = mbr.as_deref().map(parse_mbr).transpose()?;
    Ok(Cmdline { roothash, slot, on_corruption, ram, mbr })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "00112233445566778899aabbccddeeff0f1e2d3c4b5a69788796a5b4c3d2e1f0";

    #[test]
    fn cmdline() {
        let c = parse_cmdline(&format!("console=ttyS0 roothash={HASH} kiln.slot=b kiln.verity=restart panic=10\n")).unwrap();
        assert_eq!(c.root_hex(), HASH);
        assert_eq!(c.slot, "b");
        assert_eq!(c.on_corruption, Some(OnCorruption::Restart));

        let c = parse_cmdline(&format!("roothash={}", HASH.to_uppercase())).unwrap();
        assert_eq!(c.root_hex(), HASH);
        assert_eq!(c.slot, "a");
        assert_eq!(c.on_corruption, None);
        assert_eq!(parse_cmdline(&format!("roothash={HASH} kiln.verity=panic")).unwrap().on_corruption, Some(OnCorruption::Panic));

        assert!(has_roothash(&format!("a roothash={HASH}")));
        assert!(!has_roothash("console=ttyS0 kiln.config=http://x/roothash=1"));
        assert!(parse_cmdline("console=ttyS0").unwrap_err().contains("no roothash="));
        for bad in ["roothash=abc", "roothash=", &format!("roothash={HASH}0"), &format!("roothash={}zz", &HASH[..62])] {
            let e = parse_cmdline(bad).unwrap_err();
            assert!(e.contains("64 hex digits"), "{bad}: {e}");
        }
        assert!(parse_cmdline(&format!("roothash={HASH} kiln.slot=c")).unwrap_err().contains("use a or b"));
        assert!(parse_cmdline(&format!("roothash={HASH} kiln.verity=eio")).unwrap_err().contains("panic or restart"));
        let m = parse_cmdline(&format!("roothash={HASH} kiln.mbr=1a2b3c4d,2,33554432")).unwrap().mbr;
        assert_eq!(m, Some(MbrRoot { signature: 0x1a2b_3c4d, partition: 2, hash_offset: 32 << 20 }));
        assert_eq!(parse_cmdline(&format!("roothash={HASH}")).unwrap().mbr, None);
        for bad in ["1a2b3c4d,2", "1a2b3c4,2,4096", "00000000,2,4096", "1a2b3c4d,5,4096", "1a2b3c4d,2,100", "1a2b3c4d,2,0", "zz,2,4096", "1a2b3c4d,2,4096,1"] {
            let e = parse_cmdline(&format!("roothash={HASH} kiln.mbr={bad}")).unwrap_err();
            assert!(e.contains("kiln.mbr=") && e.contains("8 hex digits"), "{bad}: {e}");
        }
    }

    #[test]
    fn cmdline_words_honour_quotes() {
        assert_eq!(words(" a  b=\"c d\" e\n"), ["a", "b=c d", "e"]);
        assert_eq!(words("x=\"\""), ["x="]);
        assert!(words("").is_empty());
    }

    proptest::proptest! {
        #[test]
        fn cmdline_never_panics(s in "\\PC*") {
            let _ = parse_cmdline(&s);
        }
    }
}
