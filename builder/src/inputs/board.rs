//! Board overlays (`overlays/boards/<name>/board.toml`): what an armv7 SD
//! card needs besides the kernel and the root: the partition table the boot
//! ROM reads, raw bootloader blobs at fixed byte offsets, files for the FAT
//! boot partition, the serial console and the device tree.
//!
//! Loading checks the file on its own; [`Board::check_layout`] checks the
//! blobs against each other, the partition table and the partitions once
//! their sizes are known.

use crate::inputs::cache::Cache;
use crate::inputs::input::{self, Input, Resolved};
use crate::tomlfile::{line_in_table, parse_toml, ProfileError};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The file name of an overlay inside its directory.
pub const FILE: &str = "board.toml";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartitionTable {
    Mbr,
    Gpt,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BoardFile {
    description: Option<String>,
    partition_table: PartitionTable,
    console: Option<String>,
    #[serde(default)]
    cmdline: String,
    dtb: Option<String>,
    bios: Option<Input>,
    #[serde(default)]
    blob: Vec<BlobFile>,
    #[serde(default)]
    file: Vec<FatFile>,
    #[serde(default)]
    uboot: UbootPlace,
}

/// Where the board's u-boot is, for the boot-script check.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UbootPlace {
    /// Among the overlay's blobs, files or bios: its command table is
    /// checked against boot.scr at build time.
    #[default]
    Card,
    /// On the board itself (SPI flash, eMMC boot partition): kiln cannot
    /// read it; the build says which commands it must have.
    Board,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct BlobFile {
    input: Input,
    offset: u64,
}

/// A file for the FAT boot partition.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FatFile {
    /// Path on the FAT partition (`/MLO`).
    pub path: String,
    pub input: Input,
}

/// A raw bootloader blob written at `offset` bytes into the card.
#[derive(Debug, Clone)]
pub struct Blob {
    pub input: Input,
    pub offset: u64,
}

#[derive(Debug, Clone)]
pub struct Board {
    pub name: String,
    /// The board.toml it came from, for errors.
    pub path: PathBuf,
    pub description: Option<String>,
    pub partition_table: PartitionTable,
    /// `console=` value, e.g. `ttyS0,115200`.
    pub console: Option<String>,
    /// Extra kernel cmdline words.
    pub cmdline: String,
    /// Path under the kernel's `arch/arm/boot/dts/`; none lets u-boot pass
    /// its own device tree (QEMU virt).
    pub dtb: Option<String>,
    /// Firmware QEMU loads with `-bios` (the qemu board); not in the image.
    pub bios: Option<Input>,
    pub blobs: Vec<Blob>,
    /// In the order given; FAT paths must be unique.
    pub files: Vec<FatFile>,
    pub uboot: UbootPlace,
}

/// A board's inputs, fetched and checked against their pins.
#[derive(Debug, Clone)]
pub struct BoardInputs {
    /// Same order as [`Board::blobs`].
    pub blobs: Vec<Resolved>,
    /// Same order as [`Board::files`].
    pub files: Vec<Resolved>,
    pub bios: Option<Resolved>,
}

impl BoardInputs {
    /// Every input, for the manifest.
    pub fn all(&self) -> impl Iterator<Item = &Resolved> {
        self.blobs.iter().chain(&self.files).chain(&self.bios)
    }
}

/// A byte range `[start, end)` on the card, with what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Region {
    pub what: String,
    pub start: u64,
    pub end: u64,
}

impl Region {
    pub fn new(what: impl Into<String>, start: u64, len: u64) -> Region {
        Region { what: what.into(), start, end: start.saturating_add(len) }
    }

    fn overlaps(&self, o: &Region) -> bool {
        self.start < o.end && o.start < self.end
    }
}

impl std::fmt::Display for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (bytes {}..{})", self.what, self.start, self.end)
    }
}

/// The overlay `name` under `boards_dir` (`overlays/boards`).
pub fn load_named(boards_dir: &Path, name: &str) -> Result<Board, ProfileError> {
    if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(ProfileError::Semantic { path: boards_dir.to_path_buf(), message: format!("board `{name}`: a board name is letters, digits, - and _ (a directory under {})", boards_dir.display()) });
    }
    load(&boards_dir.join(name))
}

/// Loads `dir/board.toml`. Relative `file` inputs are relative to `dir`.
pub fn load(dir: &Path) -> Result<Board, ProfileError> {
    let path = dir.join(FILE);
    let src = std::fs::read_to_string(&path).map_err(|source| ProfileError::Read { path: path.clone(), source })?;
    let f: BoardFile = parse_toml(&path, &src)?;
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let bad = |key: String, message: String| ProfileError::Invalid { path: path.clone(), line: line_of(&src, &key), key, message };
    let anchor = |mut i: Input, key: String| -> Result<Input, ProfileError> {
        i.validate().map_err(|m| bad(key, m))?;
        if let Some(f) = i.file.as_mut().filter(|f| f.is_relative()) {
            *f = dir.join(&*f);
        }
        Ok(i)
    };
    let bios = f.bios.map(|i| anchor(i, "bios".into())).transpose()?;
    let mut blobs = Vec::new();
    for (n, b) in f.blob.into_iter().enumerate() {
        blobs.push(Blob { input: anchor(b.input, format!("blob[{n}].input"))?, offset: b.offset });
    }
    let mut files: Vec<FatFile> = Vec::new();
    for (n, ff) in f.file.into_iter().enumerate() {
        let key = format!("file[{n}].path");
        let p = ff.path.trim_start_matches('/');
        if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(bad(key, format!("`{}` is not a file path on the FAT partition; write it like \"/MLO\"", ff.path)));
        }
        if files.iter().any(|o| o.path.eq_ignore_ascii_case(&format!("/{p}"))) {
            return Err(bad(key, format!("`{}` is given twice (FAT names are case-insensitive)", ff.path)));
        }
        files.push(FatFile { path: format!("/{p}"), input: anchor(ff.input, format!("file[{n}].input"))? });
    }
    if let Some(d) = &f.dtb {
        if d.is_empty() || d.starts_with('/') || d.split('/').any(|c| c.is_empty() || c == "." || c == "..") || !d.ends_with(".dtb") {
            return Err(bad("dtb".into(), format!("`{d}` is not a dtb path under arch/arm/boot/dts/; write it like \"am335x-boneblack.dtb\"")));
        }
    }
    if let Some(c) = &f.console {
        if c.is_empty() || c.contains(char::is_whitespace) || c.starts_with("console=") {
            return Err(bad("console".into(), format!("`{c}` is not a console; write the value of console=, like \"ttyS0,115200\"")));
        }
    }
    let board = Board {
        name,
        path: path.clone(),
        description: f.description,
        partition_table: f.partition_table,
        console: f.console,
        cmdline: f.cmdline.trim().to_string(),
        dtb: f.dtb,
        bios,
        blobs,
        files,
        uboot: f.uboot,
    };
    // Blob offsets alone already collide with the table; sizes come later.
    board.check_layout(&vec![1; board.blobs.len()], &[], u64::MAX)?;
    Ok(board)
}

fn line_of(src: &str, key: &str) -> usize {
    key.rsplit_once('.').and_then(|(t, leaf)| line_in_table(src, t, leaf)).or_else(|| kiln_contract::config::line_of_key(src, key)).unwrap_or(1)
}

impl Board {
    /// The regions the partition table takes on a card of `disk_size` bytes.
    pub fn table_regions(&self, disk_size: u64) -> Vec<Region> {
        match self.partition_table {
            PartitionTable::Mbr => vec![Region::new("the MBR", 0, 512)],
            PartitionTable::Gpt => {
                let mut r = vec![Region::new("the protective MBR and primary GPT", 0, 34 * 512)];
                if disk_size != u64::MAX {
                    r.push(Region::new("the backup GPT", disk_size - 33 * 512, 33 * 512));
                }
                r
            }
        }
    }

    /// Checks that no blob (sized `sizes`, in [`Board::blobs`] order)
    /// overlaps another, the partition table or a partition, and that each
    /// ends before the card does.
    pub fn check_layout(&self, sizes: &[u64], partitions: &[Region], disk_size: u64) -> Result<(), ProfileError> {
        let src = std::fs::read_to_string(&self.path).unwrap_or_default();
        let err = |n: usize, message: String| {
            let key = format!("blob[{n}].offset");
            ProfileError::Invalid { path: self.path.clone(), line: line_of(&src, &key), key, message }
        };
        let fixed: Vec<Region> = self.table_regions(disk_size).into_iter().chain(partitions.iter().cloned()).collect();
        let blobs: Vec<Region> = self.blobs.iter().zip(sizes).enumerate().map(|(n, (b, len))| Region::new(format!("blob[{n}]"), b.offset, *len)).collect();
        for (n, b) in blobs.iter().enumerate() {
            if let Some(o) = fixed.iter().chain(&blobs[..n]).find(|o| o.overlaps(b)) {
                return Err(err(n, format!("{b} overlaps {o}; move the blob or check the board's boot ROM offset")));
            }
            if b.end > disk_size {
                return Err(err(n, format!("{b} ends past the card's end ({disk_size} bytes)")));
            }
        }
        Ok(())
    }

    /// Fetches the board's inputs (through apt for `deb`, armhf unless an
    /// input says otherwise) and checks their pins.
    pub fn resolve(&self, default_deb_arch: &str, cache: &Cache) -> Result<BoardInputs, input::InputError> {
        let what = |k: String| format!("board {} ({}): {k}", self.name, self.path.display());
        let blobs = self.blobs.iter().enumerate().map(|(n, b)| input::resolve(&what(format!("blob[{n}]")), &b.input, default_deb_arch, cache)).collect::<Result<_, _>>()?;
        let files = self.files.iter().map(|f| input::resolve(&what(format!("file {}", f.path)), &f.input, default_deb_arch, cache)).collect::<Result<_, _>>()?;
        let bios = self.bios.as_ref().map(|b| input::resolve(&what("bios".into()), b, default_deb_arch, cache)).transpose()?;
        Ok(BoardInputs { blobs, files, bios })
    }
}

/// A u-boot found among a board's inputs, and the commands it has.
#[derive(Debug)]
pub struct CheckedUboot {
    /// `blob[0]`, `file /u-boot.img` or `bios`.
    pub input: String,
    pub commands: kiln_formats::uboot_cmds::Commands,
}

/// Fewer commands than this is not a u-boot's command list.
const MIN_COMMANDS: usize = 20;

/// Which u-boot config option compiles a command in, for the error's hint.
fn config_of(cmd: &str) -> Option<&'static str> {
    Some(match cmd {
        "setexpr" => "CONFIG_CMD_SETEXPR",
        "itest" => "CONFIG_CMD_ITEST",
        "fatwrite" => "CONFIG_CMD_FAT and CONFIG_FAT_WRITE",
        "sysboot" => "CONFIG_CMD_SYSBOOT",
        "env import" => "CONFIG_CMD_IMPORTENV",
        "env export" => "CONFIG_CMD_EXPORTENV",
        "load" => "CONFIG_CMD_FS_GENERIC",
        "echo" => "CONFIG_CMD_ECHO",
        "test" | "if/then/fi" => "CONFIG_HUSH_PARSER",
        _ => return None,
    })
}

impl Board {
    /// Checks that the board's u-boot has every command `script` (a u-boot
    /// script, boot.scr's text) runs: each input (blob, FAT file, bios)
    /// holding a u-boot command table is read and checked. An input without
    /// one (an SPL such as MLO) is skipped; a board whose u-boot is not on
    /// the card says `uboot = "board"`. Errors name the board, the input
    /// and the missing commands.
    pub fn check_boot_script(&self, inputs: &BoardInputs, script: &str) -> Result<Vec<CheckedUboot>, String> {
        let needs = kiln_formats::bootscr::needs(script);
        let mut want: Vec<String> = needs.commands.clone();
        if needs.hush {
            want.push("if/then/fi".into());
        }
        let board = format!("board {} ({})", self.name, self.path.display());
        let labelled = self.blobs.iter().enumerate().map(|(n, _)| format!("blob[{n}]")).zip(&inputs.blobs)
            .chain(self.files.iter().map(|f| format!("file {}", f.path)).zip(&inputs.files))
            .chain(inputs.bios.iter().map(|b| ("bios".to_string(), b)));
        let mut found = Vec::new();
        for (label, r) in labelled {
            let what = || {
                let member = r.deb.as_ref().and_then(|d| d.member.as_deref()).map(|m| format!(" {m}")).unwrap_or_default();
                format!("{label} ({}{member})", r.source)
            };
            let bytes = std::fs::read(&r.path).map_err(|e| format!("{board}: reading {}: {e}", what()))?;
            let commands = match kiln_formats::uboot_cmds::read(&bytes) {
                // A handful of records is a coincidence in an SPL, not a
                // u-boot's command list (which has dozens).
                Ok(c) if c.commands.len() < MIN_COMMANDS => continue,
                Ok(c) => c,
                Err(kiln_formats::uboot_cmds::Error::NoTable { .. }) => continue,
                Err(e) => return Err(format!("{board}: {}: {e}; kiln cannot check that it runs boot.scr", what())),
            };
            let mut missing: Vec<&str> = want.iter().map(String::as_str).filter(|c| if *c == "if/then/fi" { !commands.hush } else { !commands.has(c) }).collect();
            missing.dedup();
            if !missing.is_empty() {
                let hints: Vec<String> = missing.iter().filter_map(|c| config_of(c).map(|k| format!("`{c}`: {k}"))).collect();
                return Err(format!(
                    "{board}: the u-boot in {} has no {} command{}, which kiln's boot.scr runs (it needs {}). Take a u-boot build that has {} ({}), or a board overlay with another u-boot",
                    what(),
                    missing.iter().map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", "),
                    if missing.len() == 1 { "" } else { "s" },
                    want.join(", "),
                    if missing.len() == 1 { "it" } else { "them" },
                    if hints.is_empty() { "see u-boot's cmd/Kconfig".to_string() } else { hints.join("; ") },
                ));
            }
            found.push(CheckedUboot { input: label, commands });
        }
        if found.is_empty() && self.uboot == UbootPlace::Card {
            return Err(format!(
                "{board}: none of its blobs, files or bios holds a u-boot command table, so kiln cannot check that its u-boot runs boot.scr (which needs {}). Add the u-boot build to the overlay, or, if the board boots a u-boot of its own (SPI flash), set `uboot = \"board\"` and make sure that u-boot has those commands",
                want.join(", ")
            ));
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn board(toml: &str) -> (tempfile::TempDir, Result<Board, ProfileError>) {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("testboard");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(FILE), toml).unwrap();
        let b = load(&dir);
        (d, b)
    }

    const PIN: &str = "0000000000000000000000000000000000000000000000000000000000000000";

    #[test]
    fn shipped_overlays_load() {
        let boards = Path::new(env!("CARGO_MANIFEST_DIR")).join("../overlays/boards");
        for name in ["qemu-armv7", "cubieboard2", "beaglebone-black", "orangepi-pc"] {
            let b = load_named(&boards, name).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(b.name, name);
        }
        let c = load_named(&boards, "cubieboard2").unwrap();
        assert_eq!((c.partition_table, c.blobs[0].offset, c.dtb.as_deref()), (PartitionTable::Mbr, 8192, Some("sun7i-a20-cubieboard2.dtb")));
        let bb = load_named(&boards, "beaglebone-black").unwrap();
        assert_eq!(bb.files[0].path, "/MLO");
        assert!(load_named(&boards, "../x").unwrap_err().to_string().contains("letters, digits"));
    }

    #[test]
    fn relative_files_are_relative_to_the_overlay() {
        let (d, b) = board(&format!("partition_table = \"gpt\"\n[[file]]\npath = \"uEnv.txt\"\ninput = {{ file = \"uEnv.txt\", sha256 = \"{PIN}\" }}\n"));
        let b = b.unwrap();
        assert_eq!(b.files[0].path, "/uEnv.txt");
        assert_eq!(b.files[0].input.file.as_deref(), Some(d.path().join("testboard/uEnv.txt").as_path()));
    }

    #[test]
    fn errors_name_file_line_and_key() {
        let (_d, b) = board("partition_table = \"mbr\"\nconsol = \"ttyS0\"\n");
        let e = b.unwrap_err().to_string();
        assert!(e.contains("board.toml:2: key `consol`"), "{e}");
        let (_d, b) = board("partition_table = \"apm\"\n");
        assert!(b.unwrap_err().to_string().contains("key `partition_table`"));
        let (_d, b) = board("partition_table = \"mbr\"\nconsole = \"console=ttyS0\"\n");
        assert!(b.unwrap_err().to_string().contains(":2: key `console`"));
        let (_d, b) = board("partition_table = \"mbr\"\ndtb = \"../x.dtb\"\n");
        assert!(b.unwrap_err().to_string().contains("key `dtb`"));
        let (_d, b) = board("partition_table = \"mbr\"\n[[blob]]\ninput = { file = \"x\" }\noffset = 8192\n");
        let e = b.unwrap_err().to_string();
        assert!(e.contains(":3: key `blob[0].input`") && e.contains("sha256"), "{e}");
        let f = format!("partition_table = \"mbr\"\n[[file]]\npath = \"/MLO\"\ninput = {{ file = \"a\", sha256 = \"{PIN}\" }}\n[[file]]\npath = \"/mlo\"\ninput = {{ file = \"a\", sha256 = \"{PIN}\" }}\n");
        let (_d, b) = board(&f);
        assert!(b.unwrap_err().to_string().contains(":6: key `file[1].path`"));
    }

    #[test]
    fn blob_overlaps_name_both_ranges() {
        let blob = |off: u64| format!("[[blob]]\ninput = {{ file = \"u\", sha256 = \"{PIN}\" }}\noffset = {off}\n");
        // Inside the MBR at load time, from the offset alone.
        let (_d, b) = board(&format!("partition_table = \"mbr\"\n{}", blob(100)));
        let e = b.unwrap_err().to_string();
        assert!(e.contains(":4: key `blob[0].offset`") && e.contains("bytes 100..101") && e.contains("the MBR (bytes 0..512)"), "{e}");
        // Inside the primary GPT.
        let (_d, b) = board(&format!("partition_table = \"gpt\"\n{}", blob(8192)));
        assert!(b.unwrap_err().to_string().contains("primary GPT (bytes 0..17408)"));
        // With sizes: two blobs, then a blob and a partition, then the backup GPT.
        let (_d, b) = board(&format!("partition_table = \"mbr\"\n{}{}", blob(1024), blob(8192)));
        let b = b.unwrap();
        let e = b.check_layout(&[8000, 10], &[], 1 << 30).unwrap_err().to_string();
        assert!(e.contains(":7: key `blob[1].offset`") && e.contains("blob[1] (bytes 8192..8202) overlaps blob[0] (bytes 1024..9024)"), "{e}");
        let part = [Region::new("partition 1 (boot)", 1 << 20, 1 << 20)];
        let e = b.check_layout(&[100, 1 << 20], &part, 1 << 30).unwrap_err().to_string();
        assert!(e.contains("overlaps partition 1 (boot) (bytes 1048576..2097152)"), "{e}");
        b.check_layout(&[100, 100], &part, 1 << 30).unwrap();
        let e = b.check_layout(&[100, 100], &[], 8200).unwrap_err().to_string();
        assert!(e.contains("ends past the card's end"), "{e}");
    }
}
