//! The commands a 32-bit little-endian ARM u-boot binary can run, read from
//! its command tables, so kiln can check that a board's u-boot has what
//! `boot.scr` uses (`env import`, `itest`, `fatwrite`, ...) before it writes
//! an image that would not boot. The algorithm is that of kiln's research
//! script `uboot_cmds.py`; on Debian bookworm's u-boot-sunxi, u-boot-omap
//! and u-boot-qemu blobs both give the same answer.
//!
//! 1. Find u-boot proper and its link address (the base):
//!    - a legacy uImage header (magic 0x27051956, header CRC checked) at any
//!      4-aligned offset, of type firmware, standalone or kernel, not
//!      compressed: the payload follows the 64-byte header, base = its load
//!      address (u-boot-sunxi-with-spl.bin has it after the SPL, at 0x8000);
//!    - else a FIT (an FDT with `/images`): the image whose `os` is
//!      "u-boot" (else the first of type firmware or standalone), its data in
//!      `data`, at `data-position` (from the FIT's start) or at `data-offset`
//!      (from the FIT's 4-aligned end); base = its `load`;
//!    - else the whole input is u-boot.bin, with no known base.
//! 2. Vote for bases: u-boot is linked `-pie` and its relocations' addends
//!    are stored in place, so a `struct cmd_tbl` holds the link-time address
//!    of its name. For the names that are always commands ("help",
//!    "version", "echo", "printenv", "setenv"), each word followed by a small
//!    `maxargs` votes base = word − offset of the name. The header's base
//!    and the eight bases with most distinct names are tried in step 3; the
//!    one giving the longest table wins (trying stops at one of 20 or more).
//! 3. Scan every 4-aligned word for `struct cmd_tbl` records of 7, 6 or 5
//!    words ({name, maxargs, cmd_rep, cmd, usage, [help], [complete]}, the
//!    last two as SYS_LONGHELP and AUTO_COMPLETE are set): name → a
//!    NUL-terminated token of at most 32 characters in the image; maxargs
//!    ≤ 1024; cmd → in the image; cmd_rep and complete → 0 or in the image;
//!    usage → a printable string, help → 0 or one. Runs of two or more
//!    back-to-back records are tables; the record size with the longest run
//!    wins, its longest run is the linker list (all commands, sorted) and
//!    the others are sub-command tables (`env`'s, `mmc`'s, ...).
//!
//! Not seen: compressed or encrypted u-boot (a compressed FIT is an
//! error), big-endian or 64-bit builds, hush keywords (`if`, `&&`: only
//! whether hush is built in, from its "syntax error" string), sub-commands
//! parsed with `strcmp()` rather than a table, and one-entry sub-tables.
//!
//! Nothing here panics or reads out of bounds on malformed input, and the
//! work is linear in the input's size (string checks are precomputed once;
//! the FDT walk and the anchor votes are bounded).

use std::collections::HashMap;

use crate::gpt::crc32;

const LEGACY_MAGIC: [u8; 4] = 0x2705_1956u32.to_be_bytes();
const FDT_MAGIC: [u8; 4] = 0xd00d_feedu32.to_be_bytes();
/// Legacy image types that may hold u-boot proper: firmware, kernel,
/// standalone.
const LEGACY_TYPES: [u8; 3] = [5, 2, 1];
/// A record's maxargs is at most this (CONFIG_SYS_MAXARGS is 16..64).
const MAX_ARGS: u32 = 1024;
/// A command name is at most this long.
const TOKEN_MAX: usize = 32;
/// A usage or help string ends (NUL) within this many bytes.
const TEXT_MAX: usize = 4096;
/// Names that every u-boot has as commands, for voting on the base.
const ANCHORS: [&[u8]; 5] = [b"help", b"version", b"echo", b"printenv", b"setenv"];
/// Occurrences of each anchor that vote (u-boot has one of each); bounds
/// the votes to a few per word.
const ANCHOR_HITS: usize = 4;
/// Voted bases tried, besides the header's.
const CANDIDATES: usize = 8;
/// A table this long is the linker list: stop trying bases.
const REAL_LIST: usize = 20;
/// An FDT path deeper than this, or a name longer, is malformed.
const FDT_DEPTH: usize = 64;
const FDT_NAME_MAX: usize = 1024;
/// FDT tokens: begin node, end node, property, nop, end.
const FDT_BEGIN_NODE: u32 = 1;
const FDT_END_NODE: u32 = 2;
const FDT_PROP: u32 = 3;
const FDT_NOP: u32 = 4;
const FDT_END: u32 = 9;

/// What a u-boot binary can run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Commands {
    /// How u-boot proper was found: "legacy uImage at 0x8000", "FIT image
    /// u-boot at 0x..", or "raw".
    pub container: String,
    /// The link address the tables were read with.
    pub base: u32,
    /// The main command list (the linker list), in table order.
    pub commands: Vec<String>,
    /// Sub-command tables (env's, mmc's, ...), each in table order.
    pub sub_tables: Vec<Vec<String>>,
    /// The hush shell (if/then/fi, &&) is built in (its "syntax error"
    /// string is present).
    pub hush: bool,
}

impl Commands {
    /// `cmd` is a command ("fatwrite") or a command and sub-command ("env
    /// import"). A sub-command of `env` counts only in a sub-table that also
    /// has `print` and `set` (nvedit.c's table, not another command's);
    /// other sub-commands in any sub-table, since a table does not say
    /// whose it is.
    pub fn has(&self, cmd: &str) -> bool {
        let (parent, sub) = cmd.split_once(' ').unwrap_or((cmd, ""));
        if !contains(&self.commands, parent) {
            return false;
        }
        if sub.is_empty() {
            return true;
        }
        self.sub_tables
            .iter()
            .filter(|t| parent != "env" || (contains(t, "print") && contains(t, "set")))
            .any(|t| contains(t, sub))
    }
}

fn contains(names: &[String], name: &str) -> bool {
    names.iter().any(|n| n == name)
}

/// Why [`read`] found no commands.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No run of two or more command records at any tried base: not a
    /// 32-bit little-endian u-boot, or compressed, or encrypted.
    #[error("no u-boot command table found ({container}, {size} bytes)")]
    NoTable { container: String, size: usize },
    /// The FIT's u-boot image is compressed; its tables cannot be read.
    #[error("FIT image {image} is compressed ({compression}): its command tables cannot be read")]
    CompressedFit { image: String, compression: String },
}

/// Reads `bytes`: u-boot.bin, u-boot.img (legacy uImage or FIT), or
/// u-boot-sunxi-with-spl.bin (SPL + image), or any blob containing one of
/// these.
pub fn read(bytes: &[u8]) -> Result<Commands, Error> {
    let found = match find_legacy(bytes) {
        Some(c) => c,
        None => find_fit(bytes)?.unwrap_or(Container {
            kind: "raw".to_string(),
            data: bytes,
            base: None,
        }),
    };
    let image = Image::new(found.data);
    let mut bases: Vec<u32> = found.base.into_iter().collect();
    for b in image.vote_bases() {
        if !bases.contains(&b) {
            bases.push(b);
        }
    }
    let Some((base, scan)) = best_scan(&image, &bases) else {
        return Err(Error::NoTable {
            container: found.kind,
            size: found.data.len(),
        });
    };
    let mut sub_tables: Vec<Vec<String>> = (scan.tables.iter())
        .map(|&t| image.names(base, t, scan.stride))
        .collect();
    let main = scan.main();
    let commands = if main < sub_tables.len() {
        sub_tables.remove(main)
    } else {
        Vec::new()
    };
    Ok(Commands {
        container: found.kind,
        base,
        commands,
        sub_tables,
        hush: has_bytes(found.data, b"syntax error"),
    })
}

/// The base (of `bases`, in order) whose scan finds the longest table; the
/// first one finding a real linker list ends the search.
fn best_scan(image: &Image, bases: &[u32]) -> Option<(u32, Scan)> {
    let mut best: Option<(u32, Scan)> = None;
    for &b in bases {
        if let Some(s) = image.scan(b) {
            let better = match &best {
                Some((_, r)) => s.longest > r.longest,
                None => true,
            };
            if better {
                best = Some((b, s));
            }
        }
        if best.as_ref().is_some_and(|(_, r)| r.longest >= REAL_LIST) {
            break;
        }
    }
    best
}

fn has_bytes(data: &[u8], needle: &[u8]) -> bool {
    data.windows(needle.len()).any(|w| w == needle)
}

/// Where u-boot proper is in the input.
struct Container<'a> {
    kind: String,
    data: &'a [u8],
    /// The link address the container gives, if any.
    base: Option<u32>,
}

fn be32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// `buf[start..start + len]`, cut short at the end of `buf` (empty past
/// it), as the Python slice.
fn clamped(buf: &[u8], start: usize, len: usize) -> &[u8] {
    let start = start.min(buf.len());
    let end = start.saturating_add(len).min(buf.len());
    &buf[start..end]
}

fn latin1(b: &[u8]) -> String {
    b.iter().map(|&c| char::from(c)).collect()
}

// --- legacy uImage ---------------------------------------------------------

/// The first legacy uImage header (CRC good) at a 4-aligned offset whose
/// image may be u-boot proper, uncompressed.
fn find_legacy(buf: &[u8]) -> Option<Container<'_>> {
    let mut o = 0usize;
    while o + 64 < buf.len() {
        if let Some(c) = legacy_at(buf, o) {
            return Some(c);
        }
        o += 4;
    }
    None
}

fn legacy_at(buf: &[u8], o: usize) -> Option<Container<'_>> {
    let h: &[u8; 64] = buf.get(o..o + 64)?.try_into().ok()?;
    if h[0..4] != LEGACY_MAGIC {
        return None;
    }
    let mut copy = *h;
    copy[4..8].fill(0);
    if crc32(&copy) != be32(h, 4)? {
        return None;
    }
    let (size, load) = (be32(h, 12)?, be32(h, 16)?);
    let (kind, comp) = (h[30], h[31]);
    if !LEGACY_TYPES.contains(&kind) || comp != 0 {
        return None;
    }
    Some(Container {
        kind: format!("legacy uImage at {o:#x}"),
        data: clamped(buf, o + 64, size as usize),
        base: Some(load),
    })
}

// --- FIT -------------------------------------------------------------------

/// A flattened device tree, as far as a FIT needs: its size and each
/// node's properties, by path ("/images/uboot"), in order of appearance.
struct Fdt<'a> {
    total: u32,
    nodes: Vec<(String, HashMap<String, &'a [u8]>)>,
}

/// Reads the FDT at `buf[o..]`; None if malformed (or once `budget`, the
/// tokens left to read over all FDTs, runs out).
fn parse_fdt<'a>(buf: &'a [u8], o: usize, budget: &mut usize) -> Option<Fdt<'a>> {
    let total = be32(buf, o + 4)?;
    let strings = o.checked_add(be32(buf, o + 12)? as usize)?;
    let mut p = o.checked_add(be32(buf, o + 8)? as usize)?;
    let mut fdt = Fdt {
        total,
        nodes: Vec::new(),
    };
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut path: Vec<String> = Vec::new();
    let mut open: Vec<usize> = Vec::new();
    loop {
        *budget = budget.checked_sub(1)?;
        let token = be32(buf, p)?;
        p = p.checked_add(4)?;
        match token {
            FDT_BEGIN_NODE => {
                let name = cstr(buf, p)?;
                p = align4(p + name.len() + 1);
                if path.len() == FDT_DEPTH {
                    return None;
                }
                path.push(latin1(name));
                open.push(fdt.begin(&mut index, node_path(&path)));
            }
            FDT_END_NODE => {
                path.pop()?;
                open.pop();
            }
            FDT_PROP => {
                let len = be32(buf, p)? as usize;
                let name = cstr(buf, strings.checked_add(be32(buf, p + 4)? as usize)?)?;
                let start = p.checked_add(8)?;
                let end = start.checked_add(len)?;
                let value = buf.get(start..end)?;
                let node = match open.last() {
                    Some(&n) => n,
                    None => *index.get("/")?,
                };
                fdt.nodes.get_mut(node)?.1.insert(latin1(name), value);
                p = align4(end);
            }
            FDT_NOP => {}
            FDT_END => return Some(fdt),
            _ => return None,
        }
    }
}

impl Fdt<'_> {
    /// Starts the node at `path` (a node seen again starts empty, in its
    /// first place) and returns its index.
    fn begin(&mut self, index: &mut HashMap<String, usize>, path: String) -> usize {
        if let Some(&i) = index.get(&path) {
            if let Some(node) = self.nodes.get_mut(i) {
                node.1.clear();
            }
            return i;
        }
        let i = self.nodes.len();
        index.insert(path.clone(), i);
        self.nodes.push((path, HashMap::new()));
        i
    }
}

/// The path of the node whose names from the root are `names`; the root's
/// own name is "", so its path is "/".
fn node_path(names: &[String]) -> String {
    let p = names.join("/");
    if p.is_empty() {
        "/".to_string()
    } else {
        p
    }
}

/// The NUL-terminated name at `buf[at..]` (without the NUL).
fn cstr(buf: &[u8], at: usize) -> Option<&[u8]> {
    let rest = buf.get(at..)?;
    let end = rest.iter().take(FDT_NAME_MAX).position(|&c| c == 0)?;
    rest.get(..end)
}

fn align4(p: usize) -> usize {
    p.saturating_add(3) & !3
}

/// A string property (trailing NULs dropped), "" if absent.
fn prop_str(props: &HashMap<String, &[u8]>, name: &str) -> String {
    let v = props.get(name).copied().unwrap_or_default();
    let end = v.iter().rposition(|&c| c != 0).map_or(0, |i| i + 1);
    latin1(&v[..end])
}

/// The first FIT (at a 4-aligned offset) with an image that is u-boot.
fn find_fit(buf: &[u8]) -> Result<Option<Container<'_>>, Error> {
    let mut budget = buf.len();
    let mut o = 0usize;
    while o + 4 <= buf.len() {
        if buf.get(o..o + 4) == Some(&FDT_MAGIC[..]) {
            match parse_fdt(buf, o, &mut budget) {
                Some(fdt) => {
                    if let Some(c) = fit_uboot(buf, o, &fdt)? {
                        return Ok(Some(c));
                    }
                }
                None if budget == 0 => break,
                None => {}
            }
        }
        o += 4;
    }
    Ok(None)
}

/// u-boot in the FIT at `o`: the image with os "u-boot", else the first of
/// type firmware or standalone. None if there is none, or its data is not
/// where its properties say.
fn fit_uboot<'a>(buf: &'a [u8], o: usize, fdt: &Fdt<'a>) -> Result<Option<Container<'a>>, Error> {
    let images: Vec<(&str, &HashMap<String, &[u8]>)> = (fdt.nodes.iter())
        .filter(|(path, _)| path.matches('/').count() == 2)
        .filter_map(|(path, props)| Some((path.strip_prefix("/images/")?, props)))
        .collect();
    let os = images.iter().find(|(_, p)| prop_str(p, "os") == "u-boot");
    let firmware = || {
        images
            .iter()
            .find(|(_, p)| matches!(prop_str(p, "type").as_str(), "firmware" | "standalone"))
    };
    let Some(&(name, props)) = os.or_else(firmware) else {
        return Ok(None);
    };
    let compression = prop_str(props, "compression");
    if !compression.is_empty() && compression != "none" {
        return Err(Error::CompressedFit {
            image: name.to_string(),
            compression,
        });
    }
    let Some(data) = fit_data(buf, o, fdt.total, props) else {
        return Ok(None);
    };
    Ok(Some(Container {
        kind: format!("FIT image {name} at {o:#x}"),
        data,
        base: props.get("load").and_then(|v| be32(v, 0)),
    }))
}

/// An image's data: embedded (`data`), or external at `data-position`
/// (from the FIT's start) or `data-offset` (from its 4-aligned end).
fn fit_data<'a>(
    buf: &'a [u8],
    o: usize,
    total: u32,
    props: &HashMap<String, &'a [u8]>,
) -> Option<&'a [u8]> {
    if let Some(&d) = props.get("data") {
        return Some(d);
    }
    let word = |name: &str| Some(be32(props.get(name)?, 0)? as usize);
    let start = match props.get("data-position") {
        Some(_) => o.checked_add(word("data-position")?)?,
        None => o
            .checked_add(align4(total as usize))?
            .checked_add(word("data-offset")?)?,
    };
    Some(clamped(buf, start, word("data-size")?))
}

// --- tables ----------------------------------------------------------------

/// u-boot proper's bytes as words, with each offset's string checks
/// precomputed (the Python caches them per offset; a table is O(1) per
/// check and O(n) to build, where checking on demand would rescan up to
/// 4 KiB per candidate record).
struct Image<'a> {
    data: &'a [u8],
    /// Little-endian words at each 4-aligned offset.
    words: Vec<u32>,
    /// PRINTABLE bytes from each offset, capped at TEXT_MAX.
    text: Vec<u16>,
    /// TOKEN bytes from each offset, capped at TOKEN_MAX + 1.
    token: Vec<u8>,
}

/// A table: its first record's word index and its number of records.
type Table = (usize, usize);

/// What one base's scan found: the record size and its tables.
struct Scan {
    stride: usize,
    longest: usize,
    tables: Vec<Table>,
}

impl Scan {
    /// The index of the longest table (the first, if several are): the
    /// linker list.
    fn main(&self) -> usize {
        self.tables
            .iter()
            .position(|t| t.1 == self.longest)
            .unwrap_or(0)
    }
}

/// Byte classes: a usage or help string's characters (tab, LF, CR, ' '
/// to '~'), and a command name's after its first ([A-Za-z0-9_.-]). A
/// table, as the checks run once per byte of the image.
const PRINTABLE: u8 = 1;
const TOKEN: u8 = 2;
const CLASSES: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut c = 0;
    while c < 256 {
        let b = c as u8;
        if matches!(b, b'\t' | b'\n' | b'\r' | 0x20..=0x7e) {
            t[c] |= PRINTABLE;
        }
        if b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-') {
            t[c] |= TOKEN;
        }
        c += 1;
    }
    t
};

fn is(class: u8, c: u8) -> bool {
    CLASSES[usize::from(c)] & class != 0
}

impl<'a> Image<'a> {
    fn new(data: &'a [u8]) -> Image<'a> {
        let words = (data.chunks_exact(4))
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let mut text = vec![0u16; data.len()];
        let mut token = vec![0u8; data.len()];
        let (mut t, mut k) = (0u16, 0u8);
        for o in (0..data.len()).rev() {
            let class = CLASSES[usize::from(data[o])];
            t = if class & PRINTABLE == 0 {
                0
            } else {
                (t + 1).min(TEXT_MAX as u16)
            };
            k = if class & TOKEN == 0 {
                0
            } else {
                (k + 1).min(TOKEN_MAX as u8 + 1)
            };
            text[o] = t;
            token[o] = k;
        }
        Image {
            data,
            words,
            text,
            token,
        }
    }

    /// The offset of link address `p` in the image, if it is inside.
    fn offset(&self, base: u32, p: u32) -> Option<usize> {
        let o = p.checked_sub(base)? as usize;
        (o < self.data.len()).then_some(o)
    }

    fn inside(&self, base: u32, p: u32) -> bool {
        self.offset(base, p).is_some()
    }

    /// The length of the command name at `p`: a NUL-terminated token of 1
    /// to 32 characters, the first maybe '?'.
    fn name_len(&self, base: u32, p: u32) -> Option<usize> {
        let o = self.offset(base, p)?;
        let first = *self.data.get(o)?;
        if !(is(TOKEN, first) || first == b'?') || first == b'-' {
            return None;
        }
        let len = 1 + self.token.get(o + 1).map_or(0, |&k| usize::from(k));
        (len <= TOKEN_MAX && self.data.get(o + len) == Some(&0)).then_some(len)
    }

    /// Whether `p` is a printable string ending (NUL) within TEXT_MAX bytes.
    fn is_text(&self, base: u32, p: u32) -> bool {
        let Some(o) = self.offset(base, p) else {
            return false;
        };
        let len = self.text.get(o).map_or(TEXT_MAX, |&t| usize::from(t));
        len < TEXT_MAX && self.data.get(o + len) == Some(&0)
    }

    /// The fields all record sizes share: name, maxargs, cmd_rep, cmd,
    /// usage.
    fn core_record(&self, base: u32, w: &[u32]) -> bool {
        let [name, maxargs, rep, cmd, usage] = match w {
            &[a, b, c, d, e, ..] => [a, b, c, d, e],
            _ => return false,
        };
        // The cheap checks first: most words fail them.
        maxargs <= MAX_ARGS
            && self.inside(base, cmd)
            && (rep == 0 || self.inside(base, rep))
            && self.name_len(base, name).is_some()
            && self.is_text(base, usage)
    }

    /// The optional fields: help (a string or 0) from 6 words, complete
    /// (0 or in the image) at 7.
    fn tail_record(&self, base: u32, w: &[u32]) -> bool {
        let bad_help = w.get(5).is_some_and(|&h| h != 0 && !self.is_text(base, h));
        let bad_complete = w.get(6).is_some_and(|&c| c != 0 && !self.inside(base, c));
        !bad_help && !bad_complete
    }

    /// The tables at `base`, for the record size (7, 6 or 5 words) whose
    /// longest table is longest (the larger size on a tie).
    fn scan(&self, base: u32) -> Option<Scan> {
        let n = self.words.len();
        // Where records may start (the shared fields check), in order;
        // each record size then checks only these.
        let starts: Vec<usize> = (0..n)
            .filter(|&i| {
                self.words
                    .get(i..i + 5)
                    .is_some_and(|w| self.core_record(base, w))
            })
            .collect();
        let mut valid = vec![false; n];
        let mut best: Option<Scan> = None;
        for stride in [7, 6, 5] {
            let records: Vec<usize> = (starts.iter().copied())
                .filter(|&i| {
                    self.words
                        .get(i..i + stride)
                        .is_some_and(|w| self.tail_record(base, w))
                })
                .collect();
            for &i in &records {
                valid[i] = true;
            }
            let tables = runs(&records, &valid, stride);
            for &i in &records {
                valid[i] = false;
            }
            let Some(longest) = tables.iter().map(|t| t.1).max() else {
                continue;
            };
            let better = match &best {
                Some(b) => longest > b.longest,
                None => true,
            };
            if better {
                best = Some(Scan {
                    stride,
                    longest,
                    tables,
                });
            }
        }
        best
    }

    /// The names of `table`'s records.
    fn names(&self, base: u32, table: Table, stride: usize) -> Vec<String> {
        (0..table.1)
            .filter_map(|k| {
                let p = *self.words.get(table.0 + k * stride)?;
                let (o, len) = (self.offset(base, p)?, self.name_len(base, p)?);
                Some(latin1(self.data.get(o..o + len)?))
            })
            .collect()
    }

    /// Candidate bases: the `CANDIDATES` with most distinct anchors voting
    /// (first voted first on a tie).
    fn vote_bases(&self) -> Vec<u32> {
        let anchors = self.anchor_offsets();
        // base -> (anchors voting, as bits; order of its first vote)
        let mut votes: HashMap<u32, (u8, usize), Seeded> = HashMap::with_hasher(Seeded::new());
        for pair in self.words.windows(2) {
            let (w, maxargs) = (pair[0], pair[1]);
            if maxargs > MAX_ARGS {
                continue;
            }
            for &(a, so) in &anchors {
                let b = w.wrapping_sub(so);
                if b % 4 == 0 {
                    let next = votes.len();
                    votes.entry(b).or_insert((0, next)).0 |= 1 << a;
                }
            }
        }
        top(votes
            .into_iter()
            .map(|(b, (bits, first))| (b, (std::cmp::Reverse(bits.count_ones()), first))))
    }

    /// (anchor index, offset) of each anchor that is a whole string (NUL
    /// before and after), at most `ANCHOR_HITS` of each.
    fn anchor_offsets(&self) -> Vec<(usize, u32)> {
        let mut hits = Vec::new();
        for (a, anchor) in ANCHORS.iter().enumerate() {
            let found = (0..self.data.len())
                .filter(|&o| o == 0 || self.data.get(o - 1) == Some(&0))
                .filter(|&o| {
                    let end = o + anchor.len();
                    self.data.get(o..end) == Some(anchor) && self.data.get(end) == Some(&0)
                })
                .take(ANCHOR_HITS);
            hits.extend(found.filter_map(|o| Some((a, u32::try_from(o).ok()?))));
        }
        hits
    }
}

/// The `CANDIDATES` bases of least key (most votes, then first voted),
/// in order; one pass, as a full sort of the votes is slow in a debug
/// build.
fn top<K: Ord + Copy>(bases: impl Iterator<Item = (u32, K)>) -> Vec<u32> {
    let mut best: Vec<(K, u32)> = Vec::with_capacity(CANDIDATES + 1);
    for (b, key) in bases {
        if best.len() == CANDIDATES && best.last().is_some_and(|l| key >= l.0) {
            continue;
        }
        let at = best.partition_point(|l| l.0 <= key);
        best.insert(at, (key, b));
        best.truncate(CANDIDATES);
    }
    best.into_iter().map(|(_, b)| b).collect()
}

/// Hashes the votes' keys (words) with a multiply and a fold: SipHash is
/// most of the voting's time in a debug build. The seed is random per
/// process, so crafted words cannot all land in one bucket.
#[derive(Clone)]
struct Seeded(u64);

impl Seeded {
    fn new() -> Seeded {
        use std::hash::{BuildHasher, Hasher};
        Seeded(
            std::collections::hash_map::RandomState::new()
                .build_hasher()
                .finish()
                | 1,
        )
    }
}

impl std::hash::BuildHasher for Seeded {
    type Hasher = WordHasher;
    fn build_hasher(&self) -> WordHasher {
        WordHasher(self.0)
    }
}

struct WordHasher(u64);

impl std::hash::Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.write_u32(u32::from(b));
        }
    }
    fn write_u32(&mut self, n: u32) {
        let h = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = h ^ (h >> 29);
    }
}

/// Runs of two or more valid records `stride` words apart, as (first,
/// count), from `records` (the valid word indexes, in order; `valid` marks
/// them). Search goes on after a run's end, or after a lone record's
/// start, so each record is looked at a bounded number of times.
fn runs(records: &[usize], valid: &[bool], stride: usize) -> Vec<Table> {
    let mut tables = Vec::new();
    let mut next = 0;
    for &i in records {
        if i < next {
            continue;
        }
        let mut j = i;
        while valid.get(j) == Some(&true) {
            j += stride;
        }
        let count = (j - i) / stride;
        if count >= 2 {
            tables.push((i, count));
            next = j;
        } else {
            next = i + 1;
        }
    }
    tables
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u32 = 0x4a00_0000;
    /// The fake's linker list, sorted as u-boot's is.
    const MAIN: [&str; 11] = [
        "echo", "env", "fatwrite", "help", "itest", "load", "printenv", "setenv", "sysboot",
        "test", "version",
    ];
    /// The fake's `env` sub-commands (cmd/nvedit.c's cmd_env_sub).
    const ENV: [&str; 6] = ["default", "delete", "export", "import", "print", "set"];

    /// Appends `s` and a NUL to `img`; returns its link address.
    fn put_str(img: &mut Vec<u8>, base: u32, s: &str) -> u32 {
        let at = base + img.len() as u32;
        img.extend_from_slice(s.as_bytes());
        img.push(0);
        at
    }

    fn put_words(img: &mut Vec<u8>, words: &[u32]) {
        for w in words {
            img.extend_from_slice(&w.to_le_bytes());
        }
    }

    /// One `struct cmd_tbl` of `stride` words: name, maxargs, cmd_rep,
    /// cmd, usage, [help], [complete].
    fn record(stride: usize, name: u32, k: u32, code: u32, usage: u32, help: u32) -> Vec<u32> {
        let rep = match k % 2 {
            1 => code,
            _ => 0,
        };
        let complete = match k % 3 {
            0 => code,
            _ => 0,
        };
        [name, 1 + k % 64, rep, code + 4 * k, usage, help, complete][..stride].to_vec()
    }

    /// A fake u-boot.bin linked at `base`, its records `stride` words: code
    /// (nops the cmd pointers point into), strings, then the linker list
    /// and env's sub-table with a zero word between.
    fn fake_uboot(base: u32, stride: usize, hush: bool) -> Vec<u8> {
        let mut img = Vec::new();
        put_words(&mut img, &[0xe1a0_0000; 0x100]);
        let code = base + 0x40;
        img.push(0);
        if hush {
            put_str(&mut img, base, "syntax error");
        }
        let mut main = Vec::new();
        for (k, name) in MAIN.iter().enumerate() {
            let n = put_str(&mut img, base, name);
            let usage = put_str(&mut img, base, &format!("{name} - does {name}ing"));
            let help = put_str(
                &mut img,
                base,
                &format!("[args]\n    - {name} help\n\tmore"),
            );
            main.push(record(
                stride,
                n,
                k as u32,
                code,
                usage,
                if k == 1 { 0 } else { help },
            ));
        }
        let mut env = Vec::new();
        for (k, name) in ENV.iter().enumerate() {
            let n = put_str(&mut img, base, name);
            let empty = put_str(&mut img, base, "");
            env.push(record(stride, n, k as u32, code, empty, empty));
        }
        img.resize(img.len().next_multiple_of(4), 0);
        for table in [main, env] {
            put_words(&mut img, &[0]);
            put_words(&mut img, &table.concat());
        }
        put_words(&mut img, &[0; 4]);
        img
    }

    /// `payload` in a legacy uImage (firmware, ARM, load = entry = `base`).
    fn legacy(payload: &[u8], base: u32) -> Vec<u8> {
        let mut h = [0u8; 64];
        h[0..4].copy_from_slice(&LEGACY_MAGIC);
        h[8..12].copy_from_slice(&1_700_000_000u32.to_be_bytes());
        h[12..16].copy_from_slice(&(payload.len() as u32).to_be_bytes());
        h[16..20].copy_from_slice(&base.to_be_bytes());
        h[20..24].copy_from_slice(&base.to_be_bytes());
        h[24..28].copy_from_slice(&crc32(payload).to_be_bytes());
        (h[28], h[29], h[30], h[31]) = (5, 2, 5, 0);
        h[32..43].copy_from_slice(b"U-Boot fake");
        let hcrc = crc32(&h);
        h[4..8].copy_from_slice(&hcrc.to_be_bytes());
        [&h[..], payload].concat()
    }

    /// xorshift64: reproducible junk.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn bytes(&mut self, n: usize) -> Vec<u8> {
            (0..n).map(|_| self.next() as u8).collect()
        }
    }

    /// An SPL-ish prefix, then `image` at 0x8000 (as
    /// u-boot-sunxi-with-spl.bin).
    fn with_spl(image: &[u8]) -> Vec<u8> {
        let mut out = Rng(7).bytes(0x8000);
        out[4..12].copy_from_slice(b"eGON.BT0");
        out.extend_from_slice(image);
        out
    }

    /// A minimal FDT writer, for FITs.
    #[derive(Default)]
    struct FdtWriter {
        structs: Vec<u8>,
        strings: Vec<u8>,
    }

    impl FdtWriter {
        fn word(&mut self, w: u32) {
            self.structs.extend_from_slice(&w.to_be_bytes());
        }
        fn pad(&mut self) {
            self.structs
                .resize(self.structs.len().next_multiple_of(4), 0);
        }
        fn begin(&mut self, name: &str) {
            self.word(FDT_BEGIN_NODE);
            self.structs.extend_from_slice(name.as_bytes());
            self.structs.push(0);
            self.pad();
        }
        fn end(&mut self) {
            self.word(FDT_END_NODE);
        }
        fn prop(&mut self, name: &str, value: &[u8]) {
            let off = self.strings.len() as u32;
            self.strings.extend_from_slice(name.as_bytes());
            self.strings.push(0);
            self.word(FDT_PROP);
            self.word(value.len() as u32);
            self.word(off);
            self.structs.extend_from_slice(value);
            self.pad();
        }
        fn text(&mut self, name: &str, value: &str) {
            self.prop(name, format!("{value}\0").as_bytes());
        }
        fn finish(mut self) -> Vec<u8> {
            self.word(FDT_END);
            let (st, ss) = (self.structs.len() as u32, self.strings.len() as u32);
            let header = [
                0xd00d_feed,
                56 + st + ss,
                56,
                56 + st,
                40,
                17,
                16,
                0,
                ss,
                st,
            ];
            let mut out: Vec<u8> = header.iter().flat_map(|w: &u32| w.to_be_bytes()).collect();
            out.extend_from_slice(&[0; 16]);
            out.extend_from_slice(&self.structs);
            out.extend_from_slice(&self.strings);
            out
        }
    }

    /// `payload` in a FIT as SPL loads it: an fdt image, then u-boot
    /// (`firmware-1`, os "u-boot"), its data embedded or after the FIT.
    fn fit(payload: &[u8], compression: &str, embedded: bool) -> Vec<u8> {
        let mut w = FdtWriter::default();
        w.begin("");
        w.text("description", "fake");
        w.begin("images");
        w.begin("fdt-1");
        w.text("type", "flat_dt");
        w.end();
        w.begin("firmware-1");
        w.text("description", "U-Boot fake");
        w.text("type", "firmware");
        w.text("os", "u-boot");
        w.text("compression", compression);
        w.prop("load", &BASE.to_be_bytes());
        if embedded {
            w.prop("data", payload);
        } else {
            w.prop("data-offset", &0u32.to_be_bytes());
            w.prop("data-size", &(payload.len() as u32).to_be_bytes());
        }
        w.end();
        w.end();
        w.end();
        let mut out = w.finish();
        if !embedded {
            out.resize(out.len().next_multiple_of(4), 0);
            out.extend_from_slice(payload);
        }
        out
    }

    fn check_fake(c: &Commands, base: u32) {
        assert_eq!(c.base, base, "{c:?}");
        assert_eq!(c.commands, MAIN, "{c:?}");
        assert_eq!(c.sub_tables, [ENV], "{c:?}");
        assert!(c.has("env import") && c.has("env export") && c.has("fatwrite") && c.has("itest"));
        assert!(!c.has("setexpr") && !c.has("env bogus") && !c.has("mmc import"));
    }

    #[test]
    fn legacy_image_after_spl() {
        let blob = with_spl(&legacy(&fake_uboot(BASE, 7, true), BASE));
        let c = read(&blob).unwrap();
        assert_eq!(c.container, "legacy uImage at 0x8000");
        assert!(c.hush);
        check_fake(&c, BASE);
    }

    #[test]
    fn raw_base_by_voting() {
        for base in [BASE, 0x8080_0000, 0] {
            let c = read(&fake_uboot(base, 7, false)).unwrap();
            assert_eq!(c.container, "raw");
            assert!(!c.hush);
            check_fake(&c, base);
        }
    }

    #[test]
    fn six_and_five_word_records() {
        for stride in [6, 5] {
            let img = fake_uboot(BASE, stride, false);
            check_fake(&read(&img).unwrap(), BASE);
            check_fake(&read(&with_spl(&legacy(&img, BASE))).unwrap(), BASE);
        }
    }

    #[test]
    fn fit_images() {
        let img = fake_uboot(BASE, 7, false);
        for embedded in [false, true] {
            for compression in ["none", ""] {
                let c = read(&with_spl(&fit(&img, compression, embedded))).unwrap();
                assert_eq!(c.container, "FIT image firmware-1 at 0x8000");
                check_fake(&c, BASE);
            }
        }
        match read(&fit(&img, "gzip", false)) {
            Err(Error::CompressedFit { image, compression }) => {
                assert_eq!(
                    (image.as_str(), compression.as_str()),
                    ("firmware-1", "gzip")
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_header_base_that_does_not_fit_is_outvoted() {
        let c = read(&legacy(&fake_uboot(BASE, 7, false), 0x8000_0000)).unwrap();
        assert_eq!(c.container, "legacy uImage at 0x0");
        check_fake(&c, BASE);
    }

    #[test]
    fn no_table() {
        for blob in [&[][..], &[0; 4096][..], &Rng(3).bytes(10_000)[..]] {
            assert!(matches!(read(blob), Err(Error::NoTable { .. })));
        }
    }

    #[test]
    fn env_subcommands_count_only_in_envs_table() {
        let c = Commands {
            container: "raw".into(),
            base: 0,
            commands: ["env", "mmc"].map(String::from).to_vec(),
            sub_tables: vec![
                ["info", "import"].map(String::from).to_vec(),
                ["default", "print", "set"].map(String::from).to_vec(),
            ],
            hush: false,
        };
        assert!(c.has("env") && c.has("mmc import") && c.has("env default") && c.has("env "));
        assert!(!c.has("env import") && !c.has("fdt import") && !c.has("fdt") && !c.has(""));
    }

    /// Junk, truncations and corruptions of each container: `read` returns.
    #[test]
    fn malformed_input_does_not_panic() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for len in (0..700).chain([4093, 65_537]) {
            let _ = read(&rng.bytes(len));
        }
        let img = fake_uboot(BASE, 7, true);
        let blobs = [
            legacy(&img, BASE),
            fit(&img, "none", false),
            fit(&img, "none", true),
            img,
        ];
        for blob in &blobs {
            for len in (0..blob.len()).step_by(37) {
                let _ = read(&blob[..len]);
            }
            for _ in 0..200 {
                let mut bad = blob.clone();
                for _ in 0..1 + rng.next() % 8 {
                    let at = (rng.next() % 512) as usize % bad.len();
                    bad[at] = rng.next() as u8;
                }
                let _ = read(&bad);
            }
        }
        // Headers that pass their own checks but point anywhere.
        for _ in 0..200 {
            let len = 1 + (rng.next() % 3000) as usize;
            let mut blob = rng.bytes(len);
            let mut h = legacy(&[], rng.next() as u32);
            h[12..16].copy_from_slice(&(rng.next() as u32).to_be_bytes());
            h[4..8].fill(0);
            let hcrc = crc32(&h[..64]);
            h[4..8].copy_from_slice(&hcrc.to_be_bytes());
            let at = (rng.next() as usize % blob.len()) & !3;
            blob.splice(at..at, h);
            let mut fdt = FDT_MAGIC.to_vec();
            for _ in 0..3 {
                fdt.extend_from_slice(&((rng.next() % 4096) as u32).to_be_bytes());
            }
            blob.splice(at..at, fdt);
            let _ = read(&blob);
        }
    }

    /// An 800 KB raw blob whose filler maximises the base votes (every
    /// other word small, anchors repeated): still well under a second in a
    /// debug build, as the scan and the votes are linear.
    #[test]
    fn large_blob_is_linear() {
        let mut blob = fake_uboot(BASE, 7, false);
        let mut rng = Rng(11);
        let size = 800 * 1024;
        for k in 0.. {
            if blob.len() >= size {
                break;
            }
            if k % 8192 == 0 {
                blob.extend_from_slice(b"\0help\0version\0echo\0printenv\0setenv\0");
                blob.resize(blob.len().next_multiple_of(4), 0);
            }
            let w = BASE + (rng.next() % size as u64) as u32;
            put_words(&mut blob, &[w, (rng.next() % 1024) as u32]);
        }
        let start = std::time::Instant::now();
        let c = read(&blob).unwrap();
        let took = start.elapsed();
        eprintln!("read {} bytes in {took:?}", blob.len());
        check_fake(&c, BASE);
        assert!(took < std::time::Duration::from_secs(10), "{took:?}");
    }
}
