//! Kernel modules of a distribution kernel: what each `.ko` declares (its
//! `.modinfo` section: name, depends, alias, softdep, firmware), the index
//! of a whole `/lib/modules/<release>` tree, the dependency closure of a
//! selection, and the index files kmod's `depmod` writes (`modules.dep`,
//! `modules.alias`, `modules.softdep`), written here so that the image does
//! not need the host's depmod and stays byte-reproducible. The node's
//! kiln-init (and busybox's modprobe) read them.

use std::collections::{BTreeMap, BTreeSet};

/// What one module declares.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModInfo {
    /// Normalised name (`-` → `_`), as the kernel and modules.dep use it.
    pub name: String,
    /// Path under the modules directory (`kernel/fs/overlayfs/overlay.ko`).
    pub path: String,
    pub depends: Vec<String>,
    pub aliases: Vec<String>,
    pub soft_pre: Vec<String>,
    pub soft_post: Vec<String>,
    pub firmware: Vec<String>,
}

pub use kiln_contract::modules::{name_of_path, normalise};

fn u16_at(b: &[u8], o: usize, le: bool) -> Option<u16> {
    let s: [u8; 2] = b.get(o..o + 2)?.try_into().ok()?;
    Some(if le { u16::from_le_bytes(s) } else { u16::from_be_bytes(s) })
}
fn u32_at(b: &[u8], o: usize, le: bool) -> Option<u32> {
    let s: [u8; 4] = b.get(o..o + 4)?.try_into().ok()?;
    Some(if le { u32::from_le_bytes(s) } else { u32::from_be_bytes(s) })
}
fn u64_at(b: &[u8], o: usize, le: bool) -> Option<u64> {
    let s: [u8; 8] = b.get(o..o + 8)?.try_into().ok()?;
    Some(if le { u64::from_le_bytes(s) } else { u64::from_be_bytes(s) })
}

/// The bytes of the named section of an ELF relocatable object (any class
/// and byte order). `None` if not ELF, damaged, or no such section.
pub fn section<'a>(b: &'a [u8], want: &str) -> Option<&'a [u8]> {
    if !b.starts_with(b"\x7fELF") {
        return None;
    }
    let class64 = match b.get(4)? {
        1 => false,
        2 => true,
        _ => return None,
    };
    let le = *b.get(5)? == 1;
    let (shoff, shentsize, shnum, shstrndx) = if class64 {
        (u64_at(b, 0x28, le)?, u16_at(b, 0x3a, le)?, u16_at(b, 0x3c, le)?, u16_at(b, 0x3e, le)?)
    } else {
        (u64::from(u32_at(b, 0x20, le)?), u16_at(b, 0x2e, le)?, u16_at(b, 0x30, le)?, u16_at(b, 0x32, le)?)
    };
    let header = |i: u16| -> Option<(u32, usize, usize)> {
        let at = usize::try_from(shoff).ok()?.checked_add(usize::from(i) * usize::from(shentsize))?;
        let name = u32_at(b, at, le)?;
        let (off, size) = if class64 { (u64_at(b, at + 0x18, le)?, u64_at(b, at + 0x20, le)?) } else { (u64::from(u32_at(b, at + 0x10, le)?), u64::from(u32_at(b, at + 0x14, le)?)) };
        Some((name, usize::try_from(off).ok()?, usize::try_from(size).ok()?))
    };
    let (_, str_off, str_size) = header(shstrndx)?;
    let names = b.get(str_off..str_off.checked_add(str_size)?)?;
    for i in 0..shnum {
        let (name, off, size) = header(i)?;
        let rest = names.get(name as usize..)?;
        let end = rest.iter().position(|&c| c == 0)?;
        if &rest[..end] == want.as_bytes() {
            return b.get(off..off.checked_add(size)?);
        }
    }
    None
}

/// Reads a module's `.modinfo`. `path` is where it sits under the modules
/// directory. `None` if the bytes are not an ELF module with a `.modinfo`.
pub fn modinfo(path: &str, bytes: &[u8]) -> Option<ModInfo> {
    let sec = section(bytes, ".modinfo")?;
    let mut m = ModInfo { name: name_of_path(path), path: path.to_string(), ..ModInfo::default() };
    for field in sec.split(|&c| c == 0).filter(|f| !f.is_empty()) {
        let field = String::from_utf8_lossy(field);
        let Some((k, v)) = field.split_once('=') else { continue };
        match k {
            "name" => m.name = normalise(v),
            "depends" => m.depends.extend(v.split(',').filter(|d| !d.is_empty()).map(normalise)),
            "alias" => m.aliases.push(v.to_string()),
            "firmware" => m.firmware.push(v.to_string()),
            "softdep" => {
                // `pre: a b post: c`
                let mut into_pre = true;
                for w in v.split_whitespace() {
                    match w {
                        "pre:" => into_pre = true,
                        "post:" => into_pre = false,
                        _ if into_pre => m.soft_pre.push(normalise(w)),
                        _ => m.soft_post.push(normalise(w)),
                    }
                }
            }
            _ => {}
        }
    }
    Some(m)
}

/// Every module of a kernel, by name, plus the names built into it.
#[derive(Debug, Clone, Default)]
pub struct Index {
    pub modules: BTreeMap<String, ModInfo>,
    pub builtin: BTreeSet<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KmodError {
    #[error("module {module} depends on {missing}, which is neither a module of this kernel nor built in")]
    MissingDep { module: String, missing: String },
    #[error("no module named {0} in this kernel (nor built in); check the name against `modules.order` of the kernel package")]
    Unknown(String),
}

impl Index {
    pub fn has(&self, name: &str) -> bool {
        let n = normalise(name);
        self.modules.contains_key(&n) || self.builtin.contains(&n)
    }

    /// The modules a name stands for: the module of that name, else every
    /// module with an alias matching it (as modprobe resolves a name).
    pub fn resolve(&self, name: &str) -> Vec<String> {
        let n = normalise(name);
        if self.modules.contains_key(&n) {
            return vec![n];
        }
        let a = kiln_contract::modules::normalise_alias(name);
        self.modules.values().filter(|m| m.aliases.iter().any(|p| kiln_contract::modules::glob(&kiln_contract::modules::normalise_alias(p), &a))).map(|m| m.name.clone()).collect()
    }

    /// `wanted` plus everything it needs: hard dependencies (an error when
    /// one is missing) and soft dependencies (taken when present, as
    /// modprobe does). Built-in names are dropped: nothing to ship.
    pub fn closure(&self, wanted: &BTreeSet<String>) -> Result<BTreeSet<String>, KmodError> {
        let mut out = BTreeSet::new();
        let mut todo: Vec<String> = wanted.iter().map(|w| normalise(w)).collect();
        while let Some(n) = todo.pop() {
            if out.contains(&n) || self.builtin.contains(&n) {
                continue;
            }
            let m = self.modules.get(&n).ok_or_else(|| KmodError::Unknown(n.clone()))?;
            for d in &m.depends {
                if !self.has(d) {
                    return Err(KmodError::MissingDep { module: n.clone(), missing: d.clone() });
                }
                todo.push(d.clone());
            }
            // A soft dependency names a module or an alias (`crypto-crc32c`):
            // modprobe takes every module it resolves to.
            for s in m.soft_pre.iter().chain(&m.soft_post) {
                todo.extend(self.resolve(s));
            }
            out.insert(n);
        }
        Ok(out)
    }

    /// A module's dependencies in depmod's order: those nearest to the
    /// module first, so a loader goes through the list backwards.
    fn dep_order(&self, name: &str) -> Vec<&ModInfo> {
        // Post-order of a depth-first walk gives "dependencies before
        // dependents"; depmod lists the reverse of that.
        fn visit<'a>(ix: &'a Index, n: &str, seen: &mut BTreeSet<String>, out: &mut Vec<&'a ModInfo>) {
            let Some(m) = ix.modules.get(n) else { return };
            for d in &m.depends {
                if seen.insert(d.clone()) {
                    visit(ix, d, seen, out);
                    if let Some(dm) = ix.modules.get(d) {
                        out.push(dm);
                    }
                }
            }
        }
        let mut seen = BTreeSet::from([name.to_string()]);
        let mut out = Vec::new();
        visit(self, name, &mut seen, &mut out);
        out.reverse();
        out
    }

    /// `modules.dep`, `modules.alias` and `modules.softdep` for the
    /// modules in `set`, in depmod's text formats, sorted by path.
    pub fn index_files(&self, set: &BTreeSet<String>) -> [(&'static str, String); 3] {
        let mut ms: Vec<&ModInfo> = set.iter().filter_map(|n| self.modules.get(n)).collect();
        ms.sort_by(|a, b| a.path.cmp(&b.path));
        let (mut dep, mut alias, mut soft) = (String::new(), String::from("# Aliases extracted from modules themselves.\n"), String::from("# Soft dependencies extracted from modules themselves.\n"));
        for m in &ms {
            let deps: Vec<&str> = self.dep_order(&m.name).into_iter().map(|d| d.path.as_str()).collect();
            dep.push_str(&format!("{}:{}{}\n", m.path, if deps.is_empty() { "" } else { " " }, deps.join(" ")));
            for a in &m.aliases {
                alias.push_str(&format!("alias {a} {}\n", m.name));
            }
            if !m.soft_pre.is_empty() || !m.soft_post.is_empty() {
                let mut line = format!("softdep {}", m.name);
                if !m.soft_pre.is_empty() {
                    line.push_str(&format!(" pre: {}", m.soft_pre.join(" ")));
                }
                if !m.soft_post.is_empty() {
                    line.push_str(&format!(" post: {}", m.soft_post.join(" ")));
                }
                soft.push_str(&line);
                soft.push('\n');
            }
        }
        [("modules.dep", dep), ("modules.alias", alias), ("modules.softdep", soft)]
    }

    /// The firmware files the modules in `set` may ask for.
    pub fn firmware(&self, set: &BTreeSet<String>) -> BTreeSet<String> {
        set.iter().filter_map(|n| self.modules.get(n)).flat_map(|m| m.firmware.iter().cloned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal little- or big-endian ELF64 relocatable object with one
    /// `.modinfo` section, as the kernel's modpost leaves it.
    pub fn fake_module(modinfo: &[&str], le: bool) -> Vec<u8> {
        let mut info = Vec::new();
        for f in modinfo {
            info.extend_from_slice(f.as_bytes());
            info.push(0);
        }
        let shstr = b"\0.modinfo\0.shstrtab\0";
        let (info_off, str_off) = (64usize, 64 + info.len());
        let shoff = (str_off + shstr.len()).next_multiple_of(8);
        let mut b = vec![0u8; shoff + 3 * 64];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = if le { 1 } else { 2 };
        b[6] = 1;
        let put16 = |b: &mut Vec<u8>, o: usize, v: u16| b[o..o + 2].copy_from_slice(&if le { v.to_le_bytes() } else { v.to_be_bytes() });
        let put32 = |b: &mut Vec<u8>, o: usize, v: u32| b[o..o + 4].copy_from_slice(&if le { v.to_le_bytes() } else { v.to_be_bytes() });
        let put64 = |b: &mut Vec<u8>, o: usize, v: u64| b[o..o + 8].copy_from_slice(&if le { v.to_le_bytes() } else { v.to_be_bytes() });
        put16(&mut b, 0x10, 1);
        put64(&mut b, 0x28, shoff as u64);
        put16(&mut b, 0x3a, 64);
        put16(&mut b, 0x3c, 3);
        put16(&mut b, 0x3e, 2);
        b[info_off..info_off + info.len()].copy_from_slice(&info);
        b[str_off..str_off + shstr.len()].copy_from_slice(shstr);
        for (i, (name, off, size)) in [(0u32, 0usize, 0usize), (1, info_off, info.len()), (10, str_off, shstr.len())].into_iter().enumerate() {
            let at = shoff + i * 64;
            put32(&mut b, at, name);
            put64(&mut b, at + 0x18, off as u64);
            put64(&mut b, at + 0x20, size as u64);
        }
        b
    }

    #[test]
    fn modinfo_fields_in_both_byte_orders() {
        for le in [true, false] {
            let b = fake_module(&["license=GPL", "depends=scsi_mod,libata", "alias=pci:v00008086d*sv*sd*bc01sc06i01*", "softdep=pre: crc32c post: foo-bar", "firmware=intel/x.bin", "name=ahci"], le);
            let m = modinfo("kernel/drivers/ata/ahci.ko", &b).unwrap();
            assert_eq!(m.name, "ahci");
            assert_eq!(m.depends, ["scsi_mod", "libata"]);
            assert_eq!(m.aliases, ["pci:v00008086d*sv*sd*bc01sc06i01*"]);
            assert_eq!((m.soft_pre.as_slice(), m.soft_post.as_slice()), (&["crc32c".to_string()][..], &["foo_bar".to_string()][..]));
            assert_eq!(m.firmware, ["intel/x.bin"]);
        }
        assert!(modinfo("x.ko", b"not elf").is_none());
        let b = fake_module(&["name=x"], true);
        // Truncated anywhere: no panic, no answer.
        for cut in [5, 20, 64, b.len() - 40] {
            assert!(modinfo("x.ko", &b[..cut]).is_none(), "cut at {cut}");
        }
        assert_eq!(name_of_path("kernel/drivers/md/dm-verity.ko.xz"), "dm_verity");
    }

    fn index(mods: &[(&str, &[&str])]) -> Index {
        let mut ix = Index::default();
        for (path, info) in mods {
            let m = modinfo(path, &fake_module(info, true)).unwrap();
            ix.modules.insert(m.name.clone(), m);
        }
        ix.builtin.insert("crc32c_generic".into());
        ix
    }

    #[test]
    fn closure_and_depmod_files() {
        let ix = index(&[
            ("kernel/drivers/scsi/sd_mod.ko", &["depends=scsi_mod,scsi_common", "alias=scsi:t-0x00*"]),
            ("kernel/drivers/scsi/scsi_mod.ko", &["depends=scsi_common"]),
            ("kernel/drivers/scsi/scsi_common.ko", &["depends="]),
            ("kernel/fs/ext4/ext4.ko", &["depends=jbd2", "softdep=pre: crc32c_generic crc32c_intel", "alias=fs-ext4"]),
            ("kernel/fs/jbd2/jbd2.ko", &[]),
            ("kernel/arch/x86/crypto/crc32c-intel.ko", &["alias=crypto-crc32c"]),
            ("kernel/lib/libcrc32c.ko", &["softdep=pre: crc32c"]),
            ("kernel/crypto/crc32c_generic.ko", &["alias=crc32c", "alias=crypto-crc32c"]),
            ("kernel/drivers/net/veth.ko", &["depends=nope"]),
        ]);
        let set = ix.closure(&BTreeSet::from(["sd_mod".to_string(), "ext4".to_string()])).unwrap();
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["crc32c_intel", "ext4", "jbd2", "scsi_common", "scsi_mod", "sd_mod"]);
        // A soft dependency on an alias takes every module that has it
        // (crc32c_generic is built in here: nothing to ship).
        let set = ix.closure(&BTreeSet::from(["libcrc32c".to_string()])).unwrap();
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["libcrc32c"]);
        let mut modular = ix.clone();
        modular.builtin.clear();
        let set = modular.closure(&BTreeSet::from(["libcrc32c".to_string()])).unwrap();
        assert_eq!(set.into_iter().collect::<Vec<_>>(), ["crc32c_generic", "libcrc32c"]);
        assert_eq!(ix.resolve("crypto-crc32c"), ["crc32c_generic", "crc32c_intel"]);
        let e = ix.closure(&BTreeSet::from(["veth".to_string()])).unwrap_err().to_string();
        assert!(e.contains("veth depends on nope"), "{e}");
        assert!(ix.closure(&BTreeSet::from(["nosuch".to_string()])).is_err());

        let set = ix.closure(&BTreeSet::from(["sd_mod".to_string(), "ext4".to_string()])).unwrap();
        let [(_, dep), (_, alias), (_, soft)] = ix.index_files(&set);
        // Nearest dependency first: a loader walks the list backwards, so
        // scsi_common loads before scsi_mod before sd_mod.
        assert!(dep.contains("kernel/drivers/scsi/sd_mod.ko: kernel/drivers/scsi/scsi_mod.ko kernel/drivers/scsi/scsi_common.ko\n"), "{dep}");
        assert!(dep.contains("kernel/fs/jbd2/jbd2.ko:\n"), "{dep}");
        assert!(alias.contains("alias scsi:t-0x00* sd_mod\n") && alias.contains("alias fs-ext4 ext4\n"), "{alias}");
        assert!(soft.contains("softdep ext4 pre: crc32c_generic crc32c_intel\n"), "{soft}");
        assert!(!dep.contains("veth"));
    }
}
