//! The root filesystem image: squashfs 4.0 with zstd, written straight from a
//! rootfs [`Tree`], with no mksquashfs at build time.
//!
//! Layout, as `mksquashfs -no-fragments -no-xattrs -no-exports` writes it:
//! superblock, zstd options, file data, inode table, directory table, id
//! table, then zeros up to a 4 KiB boundary for dm-verity. Tails are stored as
//! short blocks, not packed into fragments.
//!
//! Reproducible: inodes are numbered in a fixed walk of the tree, ids are
//! sorted, and nothing but file contents is read from the host. Blocks are
//! compressed on several threads, each independently, so the thread count
//! does not change the bytes.

use kiln_contract::stream::read_full;
use crate::tree::{Content, Entry, Kind, Tree};
use std::collections::{BTreeSet, HashMap};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use zstd::bulk::Compressor;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Data block size: a power of two from 4 KiB to 1 MiB.
    pub block_size: u32,
    /// zstd level, 1 to 22.
    pub compression_level: i32,
    /// Timestamp of every inode and of the superblock.
    pub mtime: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options { block_size: 131072, compression_level: 19, mtime: 0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stats {
    /// Bytes written, padding included (a multiple of 4096).
    pub bytes: u64,
    pub inodes: u32,
    pub files: u32,
    pub dirs: u32,
    /// File data read, and of it the bytes stored as they are because a
    /// quick pass found them incompressible (already-compressed data: image
    /// layers, archives), which skips the slow pass at `compression_level`.
    pub data_in: u64,
    pub stored_raw: u64,
    /// File bytes whose packed blocks came from the [`Store`].
    pub reused: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum SquashfsError {
    #[error("{path}: reading {}: {source}. Check that the file exists and is readable, or fix its source in the profile", host.display())]
    ReadHost { path: String, host: PathBuf, source: io::Error },
    #[error("{path}: {problem}")]
    Entry { path: String, problem: String },
    #[error("squashfs: {0}")]
    Options(String),
    #[error("squashfs: {0}")]
    TooBig(String),
    #[error("squashfs: writing the image: {source}. Check free space and permissions on the output")]
    Write { source: io::Error },
    #[error("squashfs: zstd compression failed: {source}")]
    Compress { source: io::Error },
}

type Result<T> = std::result::Result<T, SquashfsError>;

const MAGIC: u32 = 0x7371_7368;
const SUPERBLOCK_LEN: u64 = 96;
const META_SIZE: usize = 8192;
const META_RAW: u16 = 1 << 15;
const DATA_RAW: u32 = 1 << 24;
const COMP_ZSTD: u16 = 6;
/// mksquashfs leaves out the options block at zstd's default level.
const ZSTD_DEFAULT_LEVEL: i32 = 15;
const FLAG_NO_FRAGMENTS: u16 = 0x0010;
const FLAG_NO_XATTRS: u16 = 0x0200;
const FLAG_COMP_OPTS: u16 = 0x0400;
const NONE32: u32 = u32::MAX;
const NONE64: u64 = u64::MAX;
/// The kernel rejects longer names (SQUASHFS_NAME_LEN).
const NAME_MAX: usize = 256;
/// PATH_MAX - 1; the kernel rejects symlinks longer than a page.
const SYMLINK_MAX: usize = 4095;
/// Entries per directory header (SQUASHFS_DIR_COUNT).
const DIR_RUN_MAX: usize = 256;
const ALIGN: u64 = 4096;

const T_DIR: u16 = 1;
const T_FILE: u16 = 2;
const T_SYMLINK: u16 = 3;
const T_CHR: u16 = 5;
const T_LDIR: u16 = 8;
const T_LFILE: u16 = 9;

/// Writes `tree` as a squashfs image starting at the current position of
/// `out`, and leaves `out` at the end of the padded image.
pub fn write(tree: &Tree, opts: &Options, out: &mut (impl Write + Seek)) -> Result<Stats> {
    write_entries(tree.iter(), opts, out)
}

/// What [`write_with`] may use besides the tree.
#[derive(Default, Clone, Copy)]
pub struct Extras<'a> {
    /// Gets the file bytes read added as the writer goes.
    pub progress: Option<&'a AtomicU64>,
    /// Packed data of large files from earlier builds, and where this
    /// build's goes.
    pub store: Option<&'a dyn Store>,
}

/// [`write`], with progress and a store of packed files.
pub fn write_with(tree: &Tree, opts: &Options, out: &mut (impl Write + Seek), extras: Extras) -> Result<Stats> {
    write_threads(tree.iter(), opts, threads(), extras, out)
}

/// Files at least this big are looked up in, and go into, a [`Store`].
pub const STORE_MIN_BYTES: u64 = 4 << 20;

/// Packed file data kept between builds: a large file's blocks exactly as
/// this writer packs them, under a key naming its content, the block size,
/// the level and the packing rules ([`store_key`]). A rebuild with an
/// unchanged k0s or image tarball then copies its packed blocks instead of
/// compressing them again; the image's bytes are the same either way.
pub trait Store {
    /// The stored blocks of `key`, when there is an intact entry.
    fn get(&self, key: &str) -> Option<Stored>;
    /// A new entry; the writer writes the packed bytes into it, then
    /// commits it (or drops it, for data not worth keeping).
    fn create(&self) -> io::Result<Box<dyn Pending>>;
}

/// A stored file: its inode's block words and its packed bytes.
pub struct Stored {
    pub blocks: Vec<u32>,
    pub data: Box<dyn io::Read>,
    pub data_len: u64,
}

/// An entry being written; see [`Store::create`].
pub trait Pending: Write {
    fn commit(self: Box<Self>, key: &str, blocks: &[u32]) -> io::Result<()>;
}

/// Bump when the packing of a block changes for the same bytes and level.
const PACKING: u32 = 1;

/// The key of a file with content sha256 `sha256` under `opts`.
pub fn store_key(sha256: &str, opts: &Options) -> String {
    format!("{sha256}-b{}-z{}-p{PACKING}", opts.block_size, opts.compression_level)
}

/// The bytes of file data `tree` holds (what [`write_counted`] counts to).
pub fn data_bytes(tree: &Tree) -> u64 {
    tree.iter()
        .map(|(_, e)| match &e.kind {
            Kind::File(Content::Bytes(b)) => b.len() as u64,
            Kind::File(Content::Host(p)) => std::fs::metadata(p).map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

/// [`write`] over any sorted list of entries, parents first; tests use it to
/// set owners, which `Tree` has no setter for.
fn write_entries<'t>(entries: impl IntoIterator<Item = (&'t str, &'t Entry)>, opts: &Options, out: &mut (impl Write + Seek)) -> Result<Stats> {
    write_threads(entries, opts, threads(), Extras::default(), out)
}

fn write_threads<'t>(entries: impl IntoIterator<Item = (&'t str, &'t Entry)>, opts: &Options, threads: usize, extras: Extras, out: &mut (impl Write + Seek)) -> Result<Stats> {
    let block_log = check_options(opts)?;
    let nodes = collect(entries)?;
    let root =
        nodes.iter().position(|n| n.path == "/").ok_or_else(|| SquashfsError::Entry { path: "/".into(), problem: "the tree has no root directory".into() })?;
    let (ids, id_index) = id_table(&nodes)?;
    let order = post_order(&nodes, root);
    let inode_count = u32::try_from(nodes.len())
        .ok()
        .filter(|&n| n < u32::MAX)
        .ok_or_else(|| SquashfsError::TooBig(format!("{} entries; squashfs holds at most 2^32 - 2", nodes.len())))?;
    let mut ino = vec![0u32; nodes.len()];
    for (n, &i) in order.iter().enumerate() {
        ino[i] = n as u32 + 1;
    }

    let base = out.stream_position().map_err(|source| SquashfsError::Write { source })?;
    let mut sink = Sink { out, pos: 0 };
    sink.write(&[0; SUPERBLOCK_LEN as usize])?;
    let mut compressors = Vec::new();
    for _ in 0..threads.max(1) {
        compressors.push(Packer::new(opts.compression_level)?);
    }
    let mut flags = FLAG_NO_FRAGMENTS | FLAG_NO_XATTRS;
    if opts.compression_level != ZSTD_DEFAULT_LEVEL {
        // Read by unsquashfs, ignored by the kernel; always stored raw.
        flags |= FLAG_COMP_OPTS;
        let mut block = (4 | META_RAW).to_le_bytes().to_vec();
        block.extend_from_slice(&(opts.compression_level as u32).to_le_bytes());
        sink.write(&block)?;
    }

    let mut data = DataWriter {
        sink,
        compressors,
        block_size: opts.block_size as usize,
        batch: Vec::new(),
        batch_bytes: 0,
        files: vec![FileData::default(); nodes.len()],
        progress: extras.progress,
        store: extras.store,
        opts: opts.clone(),
        recording: None,
        data_in: 0,
        stored_raw: 0,
        reused: 0,
    };
    for (i, n) in nodes.iter().enumerate() {
        if let Kind::File(c) = &n.entry.kind {
            data.file(i, n.path, c)?;
        }
    }
    data.flush()?;
    let DataWriter { mut sink, mut compressors, files, data_in, stored_raw, reused, .. } = data;
    let z = &mut compressors[0].full;

    let mut inodes = Meta::default();
    let mut dirs = Meta::default();
    let mut refs = vec![(0u32, 0u16); nodes.len()];
    let mut buf = Vec::new();
    for &i in &order {
        let n = &nodes[i];
        buf.clear();
        let head = |buf: &mut Vec<u8>, ty: u16| {
            put16(buf, ty);
            put16(buf, n.entry.mode as u16);
            put16(buf, id_index[&n.entry.uid]);
            put16(buf, id_index[&n.entry.gid]);
            put32(buf, opts.mtime);
            put32(buf, ino[i]);
        };
        match &n.entry.kind {
            Kind::Dir => {
                let (start, offset) = dirs.pos()?;
                let (len, index) = listing(&mut dirs, z, &nodes, &n.children, &refs, &ino)?;
                let size = u32::try_from(len + 3).map_err(|_| SquashfsError::TooBig(format!("{}: the directory listing is over 4 GiB", n.path)))?;
                let nlink = 2 + n.children.iter().filter(|&&c| matches!(nodes[c].entry.kind, Kind::Dir)).count() as u32;
                // mksquashfs gives the root a parent one past the last inode.
                let parent = if i == root { inode_count + 1 } else { ino[n.parent] };
                if index.is_empty() && size <= u16::MAX as u32 {
                    head(&mut buf, T_DIR);
                    put32(&mut buf, start);
                    put32(&mut buf, nlink);
                    put16(&mut buf, size as u16);
                    put16(&mut buf, offset);
                    put32(&mut buf, parent);
                } else {
                    let count = u16::try_from(index.len()).map_err(|_| SquashfsError::TooBig(format!("{}: too many entries in one directory", n.path)))?;
                    head(&mut buf, T_LDIR);
                    put32(&mut buf, nlink);
                    put32(&mut buf, size);
                    put32(&mut buf, start);
                    put32(&mut buf, parent);
                    put16(&mut buf, count);
                    put16(&mut buf, offset);
                    put32(&mut buf, NONE32);
                    for IndexEntry { at, block, name } in index {
                        put32(&mut buf, at);
                        put32(&mut buf, block);
                        put32(&mut buf, name.len() as u32 - 1);
                        buf.extend_from_slice(name.as_bytes());
                    }
                }
            }
            Kind::File(_) => {
                let f = &files[i];
                match (u32::try_from(f.start), u32::try_from(f.size)) {
                    (Ok(start), Ok(size)) if f.sparse == 0 => {
                        head(&mut buf, T_FILE);
                        put32(&mut buf, start);
                        put32(&mut buf, NONE32);
                        put32(&mut buf, 0);
                        put32(&mut buf, size);
                    }
                    _ => {
                        head(&mut buf, T_LFILE);
                        put64(&mut buf, f.start);
                        put64(&mut buf, f.size);
                        put64(&mut buf, f.sparse);
                        put32(&mut buf, 1);
                        put32(&mut buf, NONE32);
                        put32(&mut buf, 0);
                        put32(&mut buf, NONE32);
                    }
                }
                for &b in &f.blocks {
                    put32(&mut buf, b);
                }
            }
            Kind::Symlink(target) => {
                head(&mut buf, T_SYMLINK);
                put32(&mut buf, 1);
                put32(&mut buf, target.len() as u32);
                buf.extend_from_slice(target.as_bytes());
            }
            Kind::CharDev(major, minor) => {
                head(&mut buf, T_CHR);
                put32(&mut buf, 1);
                // The kernel's new_encode_dev.
                put32(&mut buf, (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12));
            }
        }
        refs[i] = inodes.pos()?;
        inodes.push(&buf, z)?;
    }

    let inode_table = sink.pos;
    sink.write(&inodes.finish(z)?)?;
    let directory_table = sink.pos;
    sink.write(&dirs.finish(z)?)?;
    // Where an empty fragment table would be, as mksquashfs writes it.
    let fragment_table = sink.pos;
    let mut id_blocks = Vec::new();
    for chunk in ids.chunks(META_SIZE / 4) {
        id_blocks.push(sink.pos);
        let raw: Vec<u8> = chunk.iter().flat_map(|id| id.to_le_bytes()).collect();
        sink.write(&meta_block(&raw, z)?)?;
    }
    let id_table = sink.pos;
    let pointers: Vec<u8> = id_blocks.iter().flat_map(|p| p.to_le_bytes()).collect();
    sink.write(&pointers)?;
    let bytes_used = sink.pos;
    let padded = bytes_used.div_ceil(ALIGN) * ALIGN;
    sink.write(&vec![0; (padded - bytes_used) as usize])?;

    let (rb, ro) = refs[root];
    let mut sb = Vec::with_capacity(SUPERBLOCK_LEN as usize);
    put32(&mut sb, MAGIC);
    put32(&mut sb, inode_count);
    put32(&mut sb, opts.mtime);
    put32(&mut sb, opts.block_size);
    put32(&mut sb, 0);
    put16(&mut sb, COMP_ZSTD);
    put16(&mut sb, block_log);
    put16(&mut sb, flags);
    put16(&mut sb, ids.len() as u16);
    put16(&mut sb, 4);
    put16(&mut sb, 0);
    put64(&mut sb, (u64::from(rb) << 16) | u64::from(ro));
    put64(&mut sb, bytes_used);
    put64(&mut sb, id_table);
    put64(&mut sb, NONE64);
    put64(&mut sb, inode_table);
    put64(&mut sb, directory_table);
    put64(&mut sb, fragment_table);
    put64(&mut sb, NONE64);
    let out = sink.out;
    (|| {
        out.seek(SeekFrom::Start(base))?;
        out.write_all(&sb)?;
        out.seek(SeekFrom::Start(base + padded))?;
        out.flush()
    })()
    .map_err(|source| SquashfsError::Write { source })?;

    let count = |f: fn(&Kind) -> bool| nodes.iter().filter(|n| f(&n.entry.kind)).count() as u32;
    Ok(Stats { bytes: padded, inodes: inode_count, files: count(|k| matches!(k, Kind::File(_))), dirs: count(|k| matches!(k, Kind::Dir)), data_in, stored_raw, reused })
}

fn check_options(opts: &Options) -> Result<u16> {
    let bs = opts.block_size;
    if !bs.is_power_of_two() || !(4096..=1 << 20).contains(&bs) {
        return Err(SquashfsError::Options(format!("block size {bs} is not a power of two from 4096 to 1048576")));
    }
    if !(1..=22).contains(&opts.compression_level) {
        return Err(SquashfsError::Options(format!("zstd level {} is outside 1..=22", opts.compression_level)));
    }
    Ok(bs.trailing_zeros() as u16)
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(8)
}

struct Node<'t> {
    path: &'t str,
    name: &'t str,
    entry: &'t Entry,
    parent: usize,
    children: Vec<usize>,
}

/// The tree as an indexed list with children sorted by name, checked against
/// what squashfs and the kernel can hold.
fn collect<'t>(entries: impl IntoIterator<Item = (&'t str, &'t Entry)>) -> Result<Vec<Node<'t>>> {
    let mut nodes: Vec<Node> = Vec::new();
    let mut index: HashMap<&str, usize> = HashMap::new();
    for (path, entry) in entries {
        let bad = |problem: String| SquashfsError::Entry { path: path.into(), problem };
        let i = nodes.len();
        let (parent, name) = if path == "/" {
            (i, "")
        } else {
            let cut = path.rfind('/').ok_or_else(|| bad("the path is not absolute".into()))?;
            let parent_path = if cut == 0 { "/" } else { &path[..cut] };
            let name = &path[cut + 1..];
            let p = *index.get(parent_path).ok_or_else(|| bad("its parent directory is not in the tree".into()))?;
            if !matches!(nodes[p].entry.kind, Kind::Dir) {
                return Err(bad(format!("its parent {parent_path} is not a directory")));
            }
            if name.is_empty() || name.len() > NAME_MAX || name.contains('\0') {
                return Err(bad(format!("the name must be 1 to {NAME_MAX} bytes without NUL")));
            }
            (p, name)
        };
        if entry.mode & !0o7777 != 0 {
            return Err(bad(format!("mode {:#o} has bits beyond the permission bits 0o7777", entry.mode)));
        }
        match &entry.kind {
            Kind::Symlink(t) if t.is_empty() || t.len() > SYMLINK_MAX || t.contains('\0') => {
                return Err(bad(format!("the symlink target must be 1 to {SYMLINK_MAX} bytes without NUL")));
            }
            Kind::CharDev(major, minor) if *major >= 1 << 12 || *minor >= 1 << 20 => {
                return Err(bad(format!("device {major}:{minor} does not fit Linux's 12-bit major and 20-bit minor")));
            }
            _ => {}
        }
        if i != parent {
            nodes[parent].children.push(i);
        }
        index.insert(path, i);
        nodes.push(Node { path, name, entry, parent, children: Vec::new() });
    }
    for i in 0..nodes.len() {
        let mut children = std::mem::take(&mut nodes[i].children);
        children.sort_by(|&a, &b| nodes[a].name.as_bytes().cmp(nodes[b].name.as_bytes()));
        nodes[i].children = children;
    }
    Ok(nodes)
}

/// Sorted unique uids and gids, and each one's index in the table.
fn id_table(nodes: &[Node]) -> Result<(Vec<u32>, HashMap<u32, u16>)> {
    let ids: Vec<u32> = nodes.iter().flat_map(|n| [n.entry.uid, n.entry.gid]).collect::<BTreeSet<_>>().into_iter().collect();
    if ids.len() > u16::MAX as usize {
        return Err(SquashfsError::TooBig(format!("{} distinct uids and gids; squashfs holds at most 65535", ids.len())));
    }
    let index = ids.iter().enumerate().map(|(i, &id)| (id, i as u16)).collect();
    Ok((ids, index))
}

/// Children before their directory, because a listing points at its
/// children's inodes and a directory inode points at its listing. Iterative:
/// a deep tree must not overflow the stack.
fn post_order(nodes: &[Node], root: usize) -> Vec<usize> {
    let mut order = Vec::with_capacity(nodes.len());
    let mut stack = vec![(root, 0usize)];
    while let Some((dir, next)) = stack.last_mut() {
        let dir = *dir;
        if let Some(&child) = nodes[dir].children.get(*next) {
            *next += 1;
            if matches!(nodes[child].entry.kind, Kind::Dir) {
                stack.push((child, 0));
            } else {
                order.push(child);
            }
        } else {
            stack.pop();
            order.push(dir);
        }
    }
    order
}

/// Lets the kernel skip to the right 8 KiB of a large directory's listing.
struct IndexEntry<'n> {
    /// Offset in the listing of a header.
    at: u32,
    /// Start of the directory block holding it.
    block: u32,
    /// Its first name.
    name: &'n str,
}

/// Writes one directory's listing; returns its length and index.
fn listing<'n>(
    dirs: &mut Meta,
    z: &mut Compressor,
    nodes: &[Node<'n>],
    children: &[usize],
    refs: &[(u32, u16)],
    ino: &[u32],
) -> Result<(usize, Vec<IndexEntry<'n>>)> {
    let mut buf = Vec::new();
    let mut points: Vec<(usize, &str)> = Vec::new();
    let mut header: Option<usize> = None;
    let (mut run, mut run_block, mut run_ino, mut chunk) = (0usize, 0u32, 0u32, 0usize);
    for &c in children {
        let (block, offset) = refs[c];
        let name = nodes[c].name;
        let entry_len = 8 + name.len();
        let delta = i64::from(ino[c]) - i64::from(run_ino);
        let chunk_full = buf.len() + entry_len - chunk > META_SIZE;
        if header.is_none() || run == DIR_RUN_MAX || block != run_block || i16::try_from(delta).is_err() || chunk_full {
            if let Some(h) = header {
                buf[h..h + 4].copy_from_slice(&(run as u32 - 1).to_le_bytes());
                if chunk_full {
                    points.push((buf.len(), name));
                    chunk = buf.len();
                }
            }
            header = Some(buf.len());
            put32(&mut buf, 0);
            put32(&mut buf, block);
            put32(&mut buf, ino[c]);
            (run, run_block, run_ino) = (0, block, ino[c]);
        }
        put16(&mut buf, offset);
        put16(&mut buf, (i64::from(ino[c]) - i64::from(run_ino)) as i16 as u16);
        put16(
            &mut buf,
            match nodes[c].entry.kind {
                Kind::Dir => T_DIR,
                Kind::File(_) => T_FILE,
                Kind::Symlink(_) => T_SYMLINK,
                Kind::CharDev(..) => T_CHR,
            },
        );
        put16(&mut buf, name.len() as u16 - 1);
        buf.extend_from_slice(name.as_bytes());
        run += 1;
    }
    if let Some(h) = header {
        buf[h..h + 4].copy_from_slice(&(run as u32 - 1).to_le_bytes());
    }
    let mut index = Vec::with_capacity(points.len());
    let mut done = 0;
    for (at, name) in points {
        dirs.push(&buf[done..at], z)?;
        let (block, _) = dirs.pos()?;
        let at32 = u32::try_from(at).map_err(|_| SquashfsError::TooBig("a directory listing is over 4 GiB".into()))?;
        index.push(IndexEntry { at: at32, block, name });
        done = at;
    }
    dirs.push(&buf[done..], z)?;
    Ok((buf.len(), index))
}

/// A metadata stream (inode or directory table): 8 KiB blocks, each
/// compressed on its own behind a 2-byte length.
#[derive(Default)]
struct Meta {
    done: Vec<u8>,
    pending: Vec<u8>,
}

impl Meta {
    /// The reference of the next byte: (start of its block in the table,
    /// offset inside the uncompressed block).
    fn pos(&self) -> Result<(u32, u16)> {
        let block = u32::try_from(self.done.len()).map_err(|_| SquashfsError::TooBig("a metadata table is over 4 GiB".into()))?;
        Ok((block, self.pending.len() as u16))
    }

    fn push(&mut self, bytes: &[u8], z: &mut Compressor) -> Result<()> {
        self.pending.extend_from_slice(bytes);
        while self.pending.len() >= META_SIZE {
            let block = meta_block(&self.pending[..META_SIZE], z)?;
            self.done.extend_from_slice(&block);
            self.pending.drain(..META_SIZE);
        }
        Ok(())
    }

    fn finish(mut self, z: &mut Compressor) -> Result<Vec<u8>> {
        if !self.pending.is_empty() {
            let block = meta_block(&self.pending, z)?;
            self.done.extend_from_slice(&block);
        }
        Ok(self.done)
    }
}

fn meta_block(raw: &[u8], z: &mut Compressor) -> Result<Vec<u8>> {
    let packed = z.compress(raw).map_err(|source| SquashfsError::Compress { source })?;
    let (header, body) = if packed.len() < raw.len() { (packed.len() as u16, &packed[..]) } else { (raw.len() as u16 | META_RAW, raw) };
    let mut block = header.to_le_bytes().to_vec();
    block.extend_from_slice(body);
    Ok(block)
}

struct Sink<'o, W: Write> {
    out: &'o mut W,
    /// Relative to the start of the image.
    pos: u64,
}

impl<W: Write> Sink<'_, W> {
    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out.write_all(bytes).map_err(|source| SquashfsError::Write { source })?;
        self.pos += bytes.len() as u64;
        Ok(())
    }
}

#[derive(Debug, Clone, Default)]
struct FileData {
    start: u64,
    size: u64,
    /// Bytes in all-zero blocks, which take no space.
    sparse: u64,
    blocks: Vec<u32>,
}

struct Block {
    file: usize,
    data: Vec<u8>,
}

/// Streams file contents to the image in batches of blocks, compressed in
/// parallel and written in order.
struct DataWriter<'o, 'p, W: Write> {
    sink: Sink<'o, W>,
    compressors: Vec<Packer>,
    block_size: usize,
    batch: Vec<Block>,
    batch_bytes: usize,
    files: Vec<FileData>,
    progress: Option<&'p AtomicU64>,
    store: Option<&'p dyn Store>,
    opts: Options,
    /// The file whose packed blocks also go into a new store entry.
    recording: Option<Recording>,
    data_in: u64,
    stored_raw: u64,
    reused: u64,
}

struct Recording {
    file: usize,
    key: String,
    entry: Box<dyn Pending>,
    /// Blocks the full pass compressed: only those make an entry worth it.
    packed: u64,
    failed: bool,
}

/// One thread's compressors: a quick pass (zstd level 1) decides whether a
/// block is worth the full one. A block the quick pass cannot shrink by
/// [`WORTH`] is stored as it is: already-compressed data (gzip'd image
/// layers, archives) would cost the slow level for a block the full pass
/// too would leave at about its size. Only the block's bytes decide, so the
/// image stays reproducible.
struct Packer {
    full: Compressor<'static>,
    quick: Option<Compressor<'static>>,
}

/// The quick pass must save more than 1/32 of a block (3 %).
const WORTH: usize = 32;
/// Below this level the full pass is about as fast as the quick one.
const QUICK_FROM_LEVEL: i32 = 6;

impl Packer {
    fn new(level: i32) -> Result<Packer> {
        let z = |l| Compressor::new(l).map_err(|source| SquashfsError::Compress { source });
        Ok(Packer { full: z(level)?, quick: if level >= QUICK_FROM_LEVEL { Some(z(1)?) } else { None } })
    }

    /// The block compressed, or `None` when it should be stored as it is.
    fn pack(&mut self, data: &[u8]) -> io::Result<Option<Vec<u8>>> {
        if let Some(q) = &mut self.quick {
            if q.compress(data)?.len() >= data.len() - data.len() / WORTH {
                return Ok(None);
            }
        }
        let p = self.full.compress(data)?;
        Ok((p.len() < data.len()).then_some(p))
    }
}

/// A block after compression.
#[derive(Clone)]
enum Packed {
    /// All zeros: a hole.
    Hole,
    Raw,
    Zstd(Vec<u8>),
}

impl<W: Write> DataWriter<'_, '_, W> {
    fn file(&mut self, i: usize, path: &str, content: &Content) -> Result<()> {
        match content {
            Content::Bytes(b) => {
                for chunk in b.chunks(self.block_size) {
                    self.push(i, chunk.to_vec())?;
                }
            }
            Content::Host(host) => {
                let err = |source: io::Error| SquashfsError::ReadHost { path: path.into(), host: host.clone(), source };
                let mut f = std::fs::File::open(host).map_err(err)?;
                let meta = f.metadata().map_err(err)?;
                if !meta.is_file() {
                    return Err(err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")));
                }
                let store = self.store.filter(|_| meta.len() >= STORE_MIN_BYTES);
                if let Some(store) = store {
                    let sha = sha256_of(&mut f).map_err(err)?;
                    f.seek(SeekFrom::Start(0)).map_err(err)?;
                    let key = store_key(&sha, &self.opts);
                    if let Some(stored) = store.get(&key) {
                        if self.take_stored(i, meta.len(), stored)? {
                            return Ok(());
                        }
                    }
                    // Record this file's packed blocks for the next build.
                    self.flush()?;
                    if let Ok(entry) = store.create() {
                        self.recording = Some(Recording { file: i, key, entry, packed: 0, failed: false });
                    }
                }
                loop {
                    let mut buf = vec![0; self.block_size];
                    let n = read_full(&mut f, &mut buf).map_err(err)?;
                    if n == 0 {
                        break;
                    }
                    buf.truncate(n);
                    self.push(i, buf)?;
                    if n < self.block_size {
                        break;
                    }
                }
                if self.recording.is_some() {
                    self.flush()?;
                    if let Some(r) = self.recording.take() {
                        let blocks = self.files[i].blocks.len() as u64;
                        // Worth keeping when the full pass did most of it.
                        if !r.failed && r.packed * 2 >= blocks {
                            let _ = r.entry.commit(&r.key, &self.files[i].blocks);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Writes a stored file's packed blocks, when they fit a file of `size`
    /// bytes; false (nothing written) when they do not.
    fn take_stored(&mut self, i: usize, size: u64, mut stored: Stored) -> Result<bool> {
        let bs = self.block_size as u64;
        let words = size.div_ceil(bs);
        let on_disk: u64 = stored.blocks.iter().map(|w| u64::from(w & !DATA_RAW)).sum();
        if stored.blocks.len() as u64 != words || on_disk != stored.data_len {
            return Ok(false);
        }
        self.flush()?;
        let start = self.sink.pos;
        let mut buf = vec![0u8; 1 << 20];
        let mut left = stored.data_len;
        while left > 0 {
            let n = read_full(&mut stored.data, &mut buf[..left.min(1 << 20) as usize]).map_err(|source| SquashfsError::Write { source })?;
            if n == 0 {
                return Err(SquashfsError::Write { source: io::Error::new(io::ErrorKind::UnexpectedEof, "a stored file's packed data ended early; clear the kiln cache's squashfs-blocks directory") });
            }
            self.sink.write(&buf[..n])?;
            left -= n as u64;
        }
        let f = &mut self.files[i];
        f.start = start;
        f.size = size;
        for (k, w) in stored.blocks.iter().enumerate() {
            let len = bs.min(size - k as u64 * bs);
            if *w == 0 {
                f.sparse += len;
            } else if w & DATA_RAW != 0 {
                self.stored_raw += len;
            }
        }
        f.blocks = stored.blocks;
        self.data_in += size;
        self.reused += size;
        if let Some(p) = self.progress {
            p.fetch_add(size, Ordering::Relaxed);
        }
        Ok(true)
    }

    fn push(&mut self, file: usize, data: Vec<u8>) -> Result<()> {
        self.files[file].size += data.len() as u64;
        self.data_in += data.len() as u64;
        if let Some(p) = self.progress {
            p.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        self.batch_bytes += data.len();
        self.batch.push(Block { file, data });
        if self.batch.len() >= 16 * self.compressors.len() || self.batch_bytes >= 32 << 20 {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let batch = std::mem::take(&mut self.batch);
        self.batch_bytes = 0;
        let packed = compress_all(&mut self.compressors, &batch)?;
        for (b, packed) in batch.iter().zip(packed) {
            let f = &mut self.files[b.file];
            if f.blocks.is_empty() {
                f.start = self.sink.pos;
            }
            if let Some(r) = self.recording.as_mut().filter(|r| r.file == b.file) {
                let bytes: &[u8] = match &packed {
                    Packed::Hole => &[],
                    Packed::Zstd(p) => p,
                    Packed::Raw => &b.data,
                };
                r.packed += matches!(packed, Packed::Zstd(_)) as u64;
                if !r.failed && r.entry.write_all(bytes).is_err() {
                    r.failed = true;
                }
            }
            match packed {
                Packed::Hole => {
                    f.blocks.push(0);
                    f.sparse += b.data.len() as u64;
                }
                Packed::Zstd(p) => {
                    f.blocks.push(p.len() as u32);
                    self.sink.write(&p)?;
                }
                Packed::Raw => {
                    f.blocks.push(b.data.len() as u32 | DATA_RAW);
                    self.stored_raw += b.data.len() as u64;
                    self.sink.write(&b.data)?;
                }
            }
        }
        Ok(())
    }
}

fn sha256_of(f: &mut std::fs::File) -> io::Result<String> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = read_full(f, &mut buf)?;
        if n == 0 {
            return Ok(hex::encode(h.finalize()));
        }
        h.update(&buf[..n]);
    }
}

/// The blocks packed, in batch order; an all-zero block is a hole.
fn compress_all(compressors: &mut [Packer], batch: &[Block]) -> Result<Vec<Packed>> {
    let todo: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].data.iter().any(|&b| b != 0)).collect();
    let mut packed: Vec<Packed> = vec![Packed::Hole; batch.len()];
    let done = |r: io::Result<Option<Vec<u8>>>| r.map(|p| p.map_or(Packed::Raw, Packed::Zstd)).map_err(|source| SquashfsError::Compress { source });
    if compressors.len() == 1 || todo.len() <= 1 {
        for &i in &todo {
            packed[i] = done(compressors[0].pack(&batch[i].data))?;
        }
        return Ok(packed);
    }
    let next = AtomicUsize::new(0);
    let results = std::thread::scope(|s| {
        let (next, todo) = (&next, &todo);
        let workers: Vec<_> = compressors
            .iter_mut()
            .map(|z| {
                s.spawn(move || {
                    let mut got = Vec::new();
                    loop {
                        let k = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&i) = todo.get(k) else { break };
                        got.push((i, z.pack(&batch[i].data)));
                    }
                    got
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect::<Vec<_>>()
    });
    for (i, r) in results {
        packed[i] = done(r)?;
    }
    Ok(packed)
}

fn put16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

fn put64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use std::io::Cursor;
    use std::path::Path;
    use std::process::Command;

    fn have_unsquashfs() -> bool {
        kiln_testkit::checker("unsquashfs", "squashfs-tools").is_some()
    }

    type Entries = Vec<(String, Entry)>;

    fn entries(tree: &Tree) -> Entries {
        tree.iter().map(|(p, e)| (p.to_string(), e.clone())).collect()
    }

    fn to_file(list: &Entries, opts: &Options, img: &Path) -> Stats {
        let mut f = std::fs::File::create(img).unwrap();
        let stats = write_entries(list.iter().map(|(p, e)| (p.as_str(), e)), opts, &mut f).unwrap();
        assert_eq!(f.metadata().unwrap().len(), stats.bytes);
        assert_eq!(stats.bytes % 4096, 0);
        check_structure(&std::fs::read(img).unwrap());
        stats
    }

    fn le16(b: &[u8], p: usize) -> u16 {
        u16::from_le_bytes([b[p], b[p + 1]])
    }

    fn le32(b: &[u8], p: usize) -> u32 {
        u32::from_le_bytes(b[p..p + 4].try_into().unwrap())
    }

    fn le64(b: &[u8], p: usize) -> u64 {
        u64::from_le_bytes(b[p..p + 8].try_into().unwrap())
    }

    /// A metadata table unpacked, and where each block starts in it.
    fn unpack(img: &[u8], start: u64, end: u64) -> (Vec<u8>, BTreeMap<u32, usize>) {
        let (mut out, mut blocks, mut p) = (Vec::new(), BTreeMap::new(), start as usize);
        while p < end as usize {
            let h = le16(img, p);
            let body = &img[p + 2..p + 2 + (h & !META_RAW) as usize];
            blocks.insert((p - start as usize) as u32, out.len());
            if h & META_RAW != 0 {
                out.extend_from_slice(body);
            } else {
                out.extend(zstd::bulk::decompress(body, META_SIZE).unwrap());
            }
            p += 2 + body.len();
        }
        (out, blocks)
    }

    /// Reads the image back the way the kernel does: every directory entry's
    /// inode number and type match the inode it points at, names are sorted,
    /// index entries point at headers in the right block, and each inode
    /// number from 1 to the count is used once.
    fn check_structure(img: &[u8]) {
        let count = le32(img, 4) as usize;
        let (inodes, iblocks) = unpack(img, le64(img, 64), le64(img, 72));
        let (dirs, dblocks) = unpack(img, le64(img, 72), le64(img, 80));
        let at = |r: u64| iblocks[&((r >> 16) as u32)] + (r & 0xffff) as usize;
        let basic = |ty: u16| [0, 1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 4, 5, 6, 7][ty as usize];
        let mut seen = vec![false; count + 1];
        let mut todo = vec![le64(img, 32)];
        while let Some(r) = todo.pop() {
            let p = at(r);
            let ino = le32(&inodes, p + 12) as usize;
            assert!(!seen[ino], "inode {ino} twice");
            seen[ino] = true;
            let (start, offset, size, index) = match le16(&inodes, p) {
                T_DIR => (le32(&inodes, p + 16), le16(&inodes, p + 26), le16(&inodes, p + 24) as usize, vec![]),
                T_LDIR => {
                    let mut index = Vec::new();
                    let mut q = p + 40;
                    for _ in 0..le16(&inodes, p + 32) {
                        let len = le32(&inodes, q + 8) as usize + 1;
                        index.push((le32(&inodes, q) as usize, le32(&inodes, q + 4), inodes[q + 12..q + 12 + len].to_vec()));
                        q += 12 + len;
                    }
                    (le32(&inodes, p + 24), le16(&inodes, p + 34), le32(&inodes, p + 20) as usize, index)
                }
                _ => continue,
            };
            if size == 3 {
                continue;
            }
            let base = dblocks[&start] + offset as usize;
            let listing = &dirs[base..base + size - 3];
            let (mut pos, mut first_names, mut last) = (0, BTreeMap::new(), Vec::new());
            while pos < listing.len() {
                let (n, block, hino) = (le32(listing, pos) + 1, le32(listing, pos + 4), le32(listing, pos + 8));
                assert!(n as usize <= DIR_RUN_MAX);
                let header = pos;
                pos += 12;
                for _ in 0..n {
                    let name = listing[pos + 8..pos + 9 + le16(listing, pos + 6) as usize].to_vec();
                    first_names.entry(header).or_insert_with(|| name.clone());
                    assert!(name > last, "names out of order");
                    let child = (u64::from(block) << 16) | u64::from(le16(listing, pos));
                    let q = at(child);
                    assert_eq!(le32(&inodes, q + 12) as i64, hino as i64 + le16(listing, pos + 2) as i16 as i64);
                    assert_eq!(basic(le16(&inodes, q)), le16(listing, pos + 4));
                    todo.push(child);
                    pos += name.len() + 8;
                    last = name;
                }
            }
            for (i, block, name) in index {
                assert_eq!(first_names.get(&i), Some(&name), "index entry is not at a header");
                let (&want, _) = dblocks.range(..).rev().find(|(_, &u)| u <= base + i).unwrap();
                assert_eq!(block, want, "index entry names the wrong block");
            }
        }
        assert!(seen[1..].iter().all(|&s| s), "unused inode numbers");
    }

    fn to_vec(list: &Entries, opts: &Options) -> Vec<u8> {
        let mut c = Cursor::new(Vec::new());
        write_entries(list.iter().map(|(p, e)| (p.as_str(), e)), opts, &mut c).unwrap();
        c.into_inner()
    }

    fn unsquashfs(args: &[&str], img: &Path) -> String {
        let out = Command::new("unsquashfs").args(args).arg(img).output().unwrap();
        let text = kiln_testkit::output_text(&out);
        assert!(out.status.success(), "unsquashfs {args:?} failed:\n{text}");
        text
    }

    fn perms(kind: &Kind, mode: u32) -> String {
        let mut s = String::from(match kind {
            Kind::Dir => 'd',
            Kind::File(_) => '-',
            Kind::Symlink(_) => 'l',
            Kind::CharDev(..) => 'c',
        });
        for (shift, special, lower, upper) in [(6, 0o4000, 's', 'S'), (3, 0o2000, 's', 'S'), (0, 0o1000, 't', 'T')] {
            let bits = (mode >> shift) & 7;
            s.push(if bits & 4 != 0 { 'r' } else { '-' });
            s.push(if bits & 2 != 0 { 'w' } else { '-' });
            s.push(match (bits & 1 != 0, mode & special != 0) {
                (true, true) => lower,
                (false, true) => upper,
                (true, false) => 'x',
                (false, false) => '-',
            });
        }
        s
    }

    fn content(c: &Content) -> Vec<u8> {
        match c {
            Content::Bytes(b) => b.clone(),
            Content::Host(p) => std::fs::read(p).unwrap(),
        }
    }

    /// path → "perms uid/gid detail", the way `unsquashfs -lln` shows it.
    fn expected(list: &Entries) -> BTreeMap<String, String> {
        list.iter()
            .map(|(p, e)| {
                let detail = match &e.kind {
                    Kind::Dir => String::new(),
                    Kind::File(c) => content(c).len().to_string(),
                    Kind::Symlink(t) => format!("-> {t}"),
                    // unsquashfs 4.5 lists devices with the old 8:8 split
                    // of the encoded number (it extracts them right).
                    Kind::CharDev(major, minor) => {
                        let rdev = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
                        format!("{},{}", (rdev as i32) >> 8, rdev & 0xff)
                    }
                };
                (p.clone(), format!("{} {}/{} {detail}", perms(&e.kind, e.mode), e.uid, e.gid))
            })
            .collect()
    }

    fn listed(img: &Path) -> BTreeMap<String, String> {
        let text = unsquashfs(&["-lln"], img);
        text.lines()
            .filter_map(|l| {
                let at = l.find(" squashfs-root")?;
                let rest = &l[at + " squashfs-root".len()..];
                let (path, target) = match rest.split_once(" -> ") {
                    Some((p, t)) => (p, Some(t)),
                    None => (rest, None),
                };
                // perms, owner, size or "major, minor", date, time; a wide
                // number runs into the date, which is 10 characters.
                let t: Vec<&str> = l[..at].split_whitespace().collect();
                let size = t[2..t.len() - 1].concat();
                let size = &size[..size.len() - 10];
                let detail = match (t[0].as_bytes()[0], target) {
                    (_, Some(target)) => format!("-> {target}"),
                    (b'c' | b'-', _) => size.to_string(),
                    _ => String::new(),
                };
                let path = if path.is_empty() { "/".to_string() } else { path.to_string() };
                Some((path, format!("{} {} {detail}", t[0], t[1])))
            })
            .collect()
    }

    /// Extracts the image and checks every file's bytes and that nothing
    /// else is there.
    fn check_extract(list: &Entries, img: &Path) {
        if unsafe { libc::geteuid() } != 0 && list.iter().any(|(_, e)| matches!(e.kind, Kind::CharDev(..))) {
            kiln_testkit::skip("extraction: creating device nodes needs root");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join("x");
        unsquashfs(&["-q", "-n", "-d", dest.to_str().unwrap()], img);
        let mut found = BTreeSet::new();
        let mut todo = vec![dest.clone()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let rel = format!("/{}", e.path().strip_prefix(&dest).unwrap().display());
                if e.file_type().unwrap().is_dir() {
                    todo.push(e.path());
                }
                found.insert(rel);
            }
        }
        let want: BTreeSet<String> = list.iter().map(|(p, _)| p.clone()).filter(|p| p != "/").collect();
        assert_eq!(found, want);
        for (p, e) in list {
            let got = dest.join(&p[1..]);
            match &e.kind {
                Kind::File(c) => assert!(std::fs::read(&got).unwrap() == content(c), "{p}: content differs"),
                Kind::Symlink(t) => assert_eq!(std::fs::read_link(&got).unwrap().to_str().unwrap(), t),
                Kind::CharDev(major, minor) => {
                    use std::os::unix::fs::MetadataExt;
                    let rdev = std::fs::symlink_metadata(&got).unwrap().rdev();
                    assert_eq!((libc::major(rdev), libc::minor(rdev)), (*major, *minor), "{p}");
                }
                _ => {}
            }
        }
    }

    fn entry(kind: Kind, mode: u32, uid: u32, gid: u32) -> Entry {
        Entry { kind, mode, uid, gid }
    }

    fn set(list: &mut Entries, path: &str, e: Entry) {
        match list.binary_search_by(|(p, _)| p.as_str().cmp(path)) {
            Ok(i) => list[i].1 = e,
            Err(i) => list.insert(i, (path.into(), e)),
        }
    }

    fn text(len: usize) -> Vec<u8> {
        b"kiln writes squashfs for k0s nodes. ".iter().copied().cycle().take(len).collect()
    }

    fn sample() -> (Entries, tempfile::TempDir) {
        let host = tempfile::tempdir().unwrap();
        let host_file = host.path().join("k0s");
        std::fs::write(&host_file, kiln_testkit::noise(7, 200_000)).unwrap();
        let mut t = Tree::new();
        t.mkdir_p("/etc/kiln", 0o750).unwrap();
        t.mkdir_p("/tmp", 0o1777).unwrap();
        t.mkdir_p("/var/empty", 0o700).unwrap();
        t.file("/etc/kiln/node.toml", "role = \"worker\"\n", 0o640).unwrap();
        t.file("/usr/bin/su", text(5000), 0o4755).unwrap();
        t.file("/usr/bin/wall", text(10), 0o2711).unwrap();
        t.host_file("/usr/bin/k0s", host_file, 0o755).unwrap();
        t.symlink("/init", "sbin/kiln-init").unwrap();
        t.symlink("/bin", "/usr/bin").unwrap();
        t.symlink("/long", &"x/".repeat(2000)).unwrap();
        t.insert("/dev/null", Kind::CharDev(1, 3), 0o666).unwrap();
        t.insert("/dev/console", Kind::CharDev(5, 1), 0o600).unwrap();
        t.insert("/dev/big", Kind::CharDev(4095, 1_048_575), 0o600).unwrap();
        t.insert("/dev/mid", Kind::CharDev(300, 70_000), 0o600).unwrap();
        let mut list = entries(&t);
        set(&mut list, "/etc/kiln", entry(Kind::Dir, 0o750, 0, 1000));
        set(&mut list, "/etc/kiln/node.toml", entry(Kind::File(Content::Bytes(b"x".to_vec())), 0o640, 1000, 1000));
        set(&mut list, "/var/empty", entry(Kind::Dir, 0o700, 65534, 65534));
        set(&mut list, "/dev/console", entry(Kind::CharDev(5, 1), 0o620, 0, 5));
        set(&mut list, "/usr/bin/wall", entry(Kind::File(Content::Bytes(text(10))), 0o2711, 0, 4_000_000_000));
        (list, host)
    }

    #[test]
    fn lists_paths_modes_owners_links_devices() {
        if !have_unsquashfs() {
            return;
        }
        let (list, _host) = sample();
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.sqfs");
        let stats = to_file(&list, &Options::default(), &img);
        assert_eq!(stats.inodes as usize, list.len());
        assert_eq!(listed(&img), expected(&list));
        check_extract(&list, &img);
    }

    #[test]
    fn extracts_contents_at_block_edges_and_large_dirs() {
        if !have_unsquashfs() {
            return;
        }
        let bs = 131072usize;
        let mut t = Tree::new();
        for (i, len) in [0, 1, bs - 1, bs, bs + 1, 3 * bs + 17].into_iter().enumerate() {
            t.file(&format!("/noise/{len}"), kiln_testkit::noise(i as u64 + 1, len), 0o644).unwrap();
            t.file(&format!("/text/{len}"), text(len), 0o644).unwrap();
        }
        // Zero blocks become holes, at the start, middle and end of files.
        let mut holes = vec![0u8; 3 * bs + 17];
        holes[bs + 5] = 1;
        t.file("/holes/middle", holes, 0o644).unwrap();
        t.file("/holes/all", vec![0u8; 2 * bs + 3], 0o644).unwrap();
        // 1000 entries of long names: over 64 KiB of listing, several index
        // entries, several headers.
        for i in 0..1000 {
            t.file(&format!("/big/entry-{i:04}-{}", "n".repeat(60)), format!("{i}\n"), 0o644).unwrap();
        }
        t.mkdir_p("/big/sub", 0o755).unwrap();
        t.file("/big/sub/zz", "z", 0o644).unwrap();
        let list = entries(&t);
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.sqfs");
        let stats = to_file(&list, &Options::default(), &img);
        assert_eq!(stats.files, 12 + 2 + 1001);
        assert_eq!(stats.dirs, 6);
        check_extract(&list, &img);
        assert_eq!(listed(&img), expected(&list));
    }

    /// Root's children /a and /c are 40001 inode numbers apart, more than a
    /// directory header's 16-bit delta reaches.
    #[test]
    fn far_apart_inode_numbers_split_headers() {
        if !have_unsquashfs() {
            return;
        }
        let mut t = Tree::new();
        t.file("/a", "a", 0o644).unwrap();
        for i in 0..40_000 {
            t.file(&format!("/b/{i}"), "", 0o644).unwrap();
        }
        t.file("/c", "c", 0o644).unwrap();
        let list = entries(&t);
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.sqfs");
        to_file(&list, &Options { compression_level: 1, ..Options::default() }, &img);
        assert_eq!(listed(&img), expected(&list));
        check_extract(&list, &img);
    }

    #[test]
    fn superblock_reports_zstd_and_block_size() {
        if !have_unsquashfs() {
            return;
        }
        let (list, _host) = sample();
        let dir = tempfile::tempdir().unwrap();
        for (bs, level) in [(131072, 19), (65536, 15), (1 << 20, 3), (4096, 22)] {
            let img = dir.path().join(format!("{bs}-{level}.sqfs"));
            let stats = to_file(&list, &Options { block_size: bs, compression_level: level, mtime: 1_700_000_000 }, &img);
            let s = unsquashfs(&["-s"], &img);
            assert!(s.contains("Compression zstd"), "{s}");
            assert!(s.contains(&format!("Block size {bs}\n")), "{s}");
            assert_eq!(s.contains(&format!("compression-level {level}\n")), level != ZSTD_DEFAULT_LEVEL, "{s}");
            assert!(s.contains(&format!("Number of inodes {}\n", stats.inodes)), "{s}");
            assert!(s.contains("Fragments are not stored") && s.contains("Xattrs are not stored"), "{s}");
            assert!(s.contains("Number of ids 5\n"), "{s}");
            check_extract(&list, &img);
        }
    }

    #[test]
    fn deterministic_and_position_independent() {
        let (list, _host) = sample();
        let opts = Options { mtime: 12345, ..Options::default() };
        let a = to_vec(&list, &opts);
        let b = to_vec(&list, &opts);
        assert!(a == b, "two writes differ");
        assert_eq!(a.len() % 4096, 0);
        assert_eq!(&a[..4], b"hsqs");
        check_structure(&a);
        // Written behind a header, the image bytes are the same.
        let mut c = Cursor::new(vec![0xaa; 1000]);
        c.seek(SeekFrom::End(0)).unwrap();
        let stats = write_entries(list.iter().map(|(p, e)| (p.as_str(), e)), &opts, &mut c).unwrap();
        assert_eq!(c.position(), 1000 + stats.bytes);
        assert!(c.into_inner()[1000..] == a[..]);
    }

    #[test]
    fn thread_count_does_not_change_the_bytes() {
        let (mut list, _host) = sample();
        set(&mut list, "/noise", entry(Kind::File(Content::Bytes(kiln_testkit::noise(9, 1 << 20))), 0o644, 0, 0));
        set(&mut list, "/text", entry(Kind::File(Content::Bytes(text(1 << 20))), 0o644, 0, 0));
        let opts = Options { block_size: 16384, compression_level: 5, mtime: 0 };
        let mut images = [1, 2, 5].map(|threads| {
            let mut c = Cursor::new(Vec::new());
            write_threads(list.iter().map(|(p, e)| (p.as_str(), e)), &opts, threads, Extras::default(), &mut c).unwrap();
            c.into_inner()
        });
        let first = std::mem::take(&mut images[0]);
        assert!(images.iter().skip(1).all(|i| *i == first), "images differ by thread count");
    }

    /// Already-compressed data skips the slow pass and is stored as it is;
    /// text and zeros are not. unsquashfs reads all of it back.
    #[test]
    fn incompressible_blocks_are_stored_raw() {
        let mut t = Tree::new();
        let noise = kiln_testkit::noise(3, 1 << 20);
        let gz = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            // Random letters: gzip leaves about 6 bits a byte, and nothing
            // for zstd to find.
            e.write_all(&kiln_testkit::noise(4, 2 << 20).iter().map(|b| b'a' + b % 26).collect::<Vec<u8>>()).unwrap();
            e.finish().unwrap()
        };
        t.file("/noise", noise.clone(), 0o644).unwrap();
        t.file("/layer.tar.gz", gz.clone(), 0o644).unwrap();
        t.file("/text", text(1 << 20), 0o644).unwrap();
        t.file("/zeros", vec![0u8; 1 << 20], 0o644).unwrap();
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("a.sqfs");
        let progress = AtomicU64::new(0);
        let stats = write_with(&t, &Options::default(), &mut std::fs::File::create(&img).unwrap(), Extras { progress: Some(&progress), store: None }).unwrap();
        let total = (noise.len() + gz.len() + (2 << 20)) as u64;
        assert_eq!((stats.data_in, progress.load(Ordering::Relaxed), data_bytes(&t)), (total, total, total));
        assert_eq!(stats.stored_raw, (noise.len() + gz.len()) as u64);
        if !have_unsquashfs() {
            return;
        }
        let x = d.path().join("x");
        let out = Command::new("unsquashfs").arg("-q").arg("-n").arg("-d").arg(&x).arg(&img).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(std::fs::read(x.join("noise")).unwrap(), noise);
        assert_eq!(std::fs::read(x.join("layer.tar.gz")).unwrap(), gz);
        assert_eq!(std::fs::read(x.join("text")).unwrap(), text(1 << 20));
    }

    type Stash = std::sync::Arc<std::sync::Mutex<BTreeMap<String, (Vec<u32>, Vec<u8>)>>>;

    /// A store in memory, for the tests.
    #[derive(Default)]
    struct MemStore(Stash);

    struct MemPending(Stash, Vec<u8>);

    impl Write for MemPending {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.1.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Pending for MemPending {
        fn commit(self: Box<Self>, key: &str, blocks: &[u32]) -> io::Result<()> {
            self.0.lock().unwrap().insert(key.into(), (blocks.to_vec(), self.1));
            Ok(())
        }
    }

    impl Store for MemStore {
        fn get(&self, key: &str) -> Option<Stored> {
            let m = self.0.lock().unwrap();
            let (blocks, data) = m.get(key)?;
            Some(Stored { blocks: blocks.clone(), data_len: data.len() as u64, data: Box::new(Cursor::new(data.clone())) })
        }
        fn create(&self) -> io::Result<Box<dyn Pending>> {
            Ok(Box::new(MemPending(self.0.clone(), Vec::new())))
        }
    }

    /// A second build takes a large file's packed blocks from the store and
    /// writes the same bytes; incompressible files are not kept; a stored
    /// entry that does not fit the file is ignored.
    #[test]
    fn a_store_gives_the_same_image_without_compressing_again() {
        let d = tempfile::tempdir().unwrap();
        let big = d.path().join("big");
        let mut content = text(5 << 20);
        content.extend(vec![0u8; 300_000]);
        content.extend(text(100_000));
        std::fs::write(&big, &content).unwrap();
        let noise = d.path().join("noise");
        std::fs::write(&noise, kiln_testkit::noise(5, 5 << 20)).unwrap();
        let mut t = Tree::new();
        t.host_file("/usr/bin/big", big.clone(), 0o755).unwrap();
        t.host_file("/images/noise.tar", noise.clone(), 0o644).unwrap();
        t.file("/etc/small", "x", 0o644).unwrap();
        let store = MemStore::default();
        let image = |store: Option<&dyn Store>| {
            let mut c = Cursor::new(Vec::new());
            let stats = write_with(&t, &Options::default(), &mut c, Extras { progress: None, store }).unwrap();
            (c.into_inner(), stats)
        };
        let (plain, _) = image(None);
        let (first, s1) = image(Some(&store));
        assert_eq!(s1.reused, 0);
        assert_eq!(store.0.lock().unwrap().len(), 1, "only the compressible large file is kept");
        let (second, s2) = image(Some(&store));
        assert_eq!(s2.reused, content.len() as u64);
        assert!(plain == first && first == second, "the store changes no byte");
        // An entry for another size of file is not used.
        let key = store.0.lock().unwrap().keys().next().unwrap().clone();
        store.0.lock().unwrap().get_mut(&key).unwrap().0.pop();
        let (third, s3) = image(Some(&store));
        assert_eq!((s3.reused, third == plain), (0, true));
    }

    #[test]
    fn tree_api_writes() {
        let mut t = Tree::new();
        t.file("/a", "a", 0o644).unwrap();
        let mut out = Cursor::new(Vec::new());
        let stats = write(&t, &Options::default(), &mut out).unwrap();
        assert_eq!(stats, Stats { bytes: 4096, inodes: 2, files: 1, dirs: 1, data_in: 1, stored_raw: 1, reused: 0 });
        let empty = write(&Tree::new(), &Options::default(), &mut Cursor::new(Vec::new())).unwrap();
        assert_eq!(empty.inodes, 1);
        if have_unsquashfs() {
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("img.sqfs");
            let list = entries(&Tree::new());
            to_file(&list, &Options::default(), &img);
            assert_eq!(listed(&img), expected(&list));
            check_extract(&list, &img);
        }
    }

    #[test]
    fn errors_name_the_path() {
        let err = |t: &Tree| write(t, &Options::default(), &mut Cursor::new(Vec::new())).unwrap_err().to_string();
        let mut t = Tree::new();
        t.host_file("/usr/bin/k0s", "/nonexistent/k0s".into(), 0o755).unwrap();
        let e = err(&t);
        assert!(e.starts_with("/usr/bin/k0s: reading /nonexistent/k0s: No such file"), "{e}");

        let mut t = Tree::new();
        t.host_file("/etc", "/".into(), 0o755).unwrap();
        assert!(err(&t).contains("not a regular file"));

        let mut t = Tree::new();
        t.file(&format!("/{}", "a".repeat(257)), "", 0o644).unwrap();
        assert!(err(&t).contains("1 to 256 bytes"));

        let mut t = Tree::new();
        t.symlink("/l", "").unwrap();
        assert!(err(&t).starts_with("/l: the symlink target"));

        let mut t = Tree::new();
        t.symlink("/l", &"a".repeat(4096)).unwrap();
        assert!(err(&t).starts_with("/l: the symlink target"));

        let mut t = Tree::new();
        t.insert("/dev/x", Kind::CharDev(4096, 0), 0o600).unwrap();
        assert!(err(&t).starts_with("/dev/x: device 4096:0"));

        let mut t = Tree::new();
        t.file("/f", "", 0o100644).unwrap();
        assert!(err(&t).starts_with("/f: mode 0o100644"));

        let mut t = Tree::new();
        t.file("/f\0g", "", 0o644).unwrap();
        assert!(err(&t).contains("without NUL"));

        let orphan = [("/".to_string(), entry(Kind::Dir, 0o755, 0, 0)), ("/a/b".to_string(), entry(Kind::Dir, 0o755, 0, 0))];
        let e = write_entries(orphan.iter().map(|(p, e)| (p.as_str(), e)), &Options::default(), &mut Cursor::new(Vec::new())).unwrap_err();
        assert!(e.to_string().starts_with("/a/b: its parent"), "{e}");

        let t = Tree::new();
        for bad in [
            Options { block_size: 1000, ..Options::default() },
            Options { block_size: 2 << 20, ..Options::default() },
            Options { compression_level: 0, ..Options::default() },
            Options { compression_level: 23, ..Options::default() },
        ] {
            let e = write(&t, &bad, &mut Cursor::new(Vec::new())).unwrap_err();
            assert!(matches!(e, SquashfsError::Options(_)), "{e}");
        }
    }

    #[test]
    fn deep_trees_do_not_overflow_the_stack() {
        // Built by hand: Tree::mkdir_p itself recurses.
        let dir = entry(Kind::Dir, 0o755, 0, 0);
        let mut list: Entries = (0..=5000).map(|depth| ("/d".repeat(depth), dir.clone())).collect();
        list[0].0 = "/".into();
        let stats =
            write_entries(list.iter().map(|(p, e)| (p.as_str(), e)), &Options { compression_level: 1, ..Options::default() }, &mut Cursor::new(Vec::new()))
                .unwrap();
        assert_eq!(stats.dirs, 5001);
    }

    #[test]
    fn incompressible_metadata_is_stored_raw() {
        let mut z = Compressor::new(19).unwrap();
        let mut m = Meta::default();
        m.push(&kiln_testkit::noise(3, META_SIZE + 10), &mut z).unwrap();
        assert_eq!(m.pos().unwrap(), ((META_SIZE + 2) as u32, 10));
        let out = m.finish(&mut z).unwrap();
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), META_SIZE as u16 | META_RAW);
        assert!(out[2..2 + META_SIZE] == kiln_testkit::noise(3, META_SIZE + 10)[..META_SIZE]);
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-z0-9_][a-zA-Z0-9_.-]{0,11}"
    }

    #[derive(Debug, Clone)]
    enum Gen {
        Dir(u32),
        File(Vec<u8>, u32),
        Zeros(usize),
        Link(String),
        Dev(u32, u32),
    }

    fn gen() -> impl Strategy<Value = Gen> {
        prop_oneof![
            (0u32..0o7777).prop_map(Gen::Dir),
            (prop::collection::vec(any::<u8>(), 0..10_000), 0u32..0o7777).prop_map(|(b, m)| Gen::File(b, m)),
            (prop::collection::vec(0u8..4, 0..20_000), 0u32..0o7777).prop_map(|(b, m)| Gen::File(b, m)),
            (0usize..20_000).prop_map(Gen::Zeros),
            "[a-zA-Z0-9_./-]{1,40}".prop_map(Gen::Link),
            (0u32..4096, 0u32..1 << 20).prop_map(|(a, b)| Gen::Dev(a, b)),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn random_trees_round_trip(
            items in prop::collection::vec((prop::collection::vec(name(), 1..4), gen(), 0u32..3, 0u32..3), 0..40),
        ) {
            let mut t = Tree::new();
            for (parts, g, _, _) in &items {
                let path = format!("/{}", parts.join("/"));
                // Tree::mkdir_p puts a directory under a file; keep to valid trees.
                if (1..parts.len()).any(|k| t.get(&format!("/{}", parts[..k].join("/"))).is_some_and(|e| !matches!(e.kind, Kind::Dir))) {
                    continue;
                }
                // Conflicting paths are the tree's business, not ours: skip them.
                let _ = match g {
                    Gen::Dir(m) => t.mkdir_p(&path, *m),
                    Gen::File(b, m) => t.file(&path, b.clone(), *m),
                    Gen::Zeros(n) => t.file(&path, vec![0; *n], 0o644),
                    Gen::Link(s) => t.symlink(&path, s),
                    Gen::Dev(a, b) => t.insert(&path, Kind::CharDev(*a, *b), 0o600),
                };
            }
            let mut list = entries(&t);
            for ((_, e), (_, _, u, g)) in list.iter_mut().zip(items.iter().cycle()) {
                (e.uid, e.gid) = (*u * 1000, *g * 7);
            }
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("img.sqfs");
            to_file(&list, &Options { block_size: 4096, compression_level: 3, mtime: 1 }, &img);
            if have_unsquashfs() {
                prop_assert_eq!(listed(&img), expected(&list));
                check_extract(&list, &img);
            }
        }
    }

    /// Over 4 GiB, mostly holes: the extended file inode with 64-bit sizes.
    #[test]
    #[ignore]
    fn file_over_4gib() {
        if !have_unsquashfs() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("big");
        let f = std::fs::File::create(&src).unwrap();
        let size = (4u64 << 30) + 5000;
        f.set_len(size).unwrap();
        {
            use std::os::unix::fs::FileExt;
            f.write_all_at(b"tail", size - 4).unwrap();
            f.write_all_at(b"head", 0).unwrap();
        }
        let mut t = Tree::new();
        t.host_file("/big", src, 0o644).unwrap();
        let img = dir.path().join("img.sqfs");
        to_file(&entries(&t), &Options::default(), &img);
        let dest = dir.path().join("x");
        unsquashfs(&["-q", "-n", "-d", dest.to_str().unwrap()], &img);
        let out = std::fs::File::open(dest.join("big")).unwrap();
        assert_eq!(out.metadata().unwrap().len(), size);
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 4];
        out.read_exact_at(&mut b, size - 4).unwrap();
        assert_eq!(&b, b"tail");
        out.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(&b, b"head");
    }

    /// `cargo test -p kiln --lib bench_vs_mksquashfs -- --ignored --nocapture`,
    /// with KILN_BENCH_DIR to pick the directory (default /usr/libexec).
    #[test]
    #[ignore]
    fn bench_vs_mksquashfs() {
        use std::os::unix::fs::PermissionsExt;
        let src = PathBuf::from(std::env::var("KILN_BENCH_DIR").unwrap_or_else(|_| "/usr/libexec".into()));
        let mut t = Tree::new();
        let mut todo = vec![src.clone()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let e = e.unwrap();
                let meta = std::fs::symlink_metadata(e.path()).unwrap();
                let rel = format!("/{}", e.path().strip_prefix(&src).unwrap().display());
                let mode = meta.permissions().mode() & 0o7777;
                if meta.is_dir() {
                    t.mkdir_p(&rel, mode).unwrap();
                    todo.push(e.path());
                } else if meta.is_file() {
                    t.host_file(&rel, e.path(), mode).unwrap();
                } else if meta.is_symlink() {
                    t.symlink(&rel, std::fs::read_link(e.path()).unwrap().to_str().unwrap()).unwrap();
                }
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let ours = dir.path().join("ours.sqfs");
        let start = std::time::Instant::now();
        let stats = write(&t, &Options::default(), &mut std::fs::File::create(&ours).unwrap()).unwrap();
        let ours_time = start.elapsed();
        let theirs = dir.path().join("theirs.sqfs");
        let start = std::time::Instant::now();
        let status = Command::new("mksquashfs")
            .arg(&src)
            .arg(&theirs)
            .args(["-comp", "zstd", "-Xcompression-level", "19", "-noappend", "-no-fragments", "-no-xattrs", "-quiet"])
            .stdout(std::process::Stdio::null())
            .status();
        let theirs_time = start.elapsed();
        let input = t.content_size().unwrap();
        println!("input: {} ({} MB in {} files, {} dirs)", src.display(), input / 1_000_000, stats.files, stats.dirs);
        println!("kiln:       {:7.2} s  {:>11} bytes", ours_time.as_secs_f64(), stats.bytes);
        match status {
            Ok(s) if s.success() => {
                let size = std::fs::metadata(&theirs).unwrap().len();
                println!("mksquashfs: {:7.2} s  {:>11} bytes", theirs_time.as_secs_f64(), size);
                println!("kiln/mksquashfs: time {:.2}x, size {:.3}x", ours_time.as_secs_f64() / theirs_time.as_secs_f64(), stats.bytes as f64 / size as f64);
                // Same files either way (mksquashfs keeps host mtimes and owners).
                let (a, b) = (dir.path().join("a"), dir.path().join("b"));
                unsquashfs(&["-q", "-n", "-d", a.to_str().unwrap()], &ours);
                unsquashfs(&["-q", "-n", "-d", b.to_str().unwrap()], &theirs);
                let diff = Command::new("diff").args(["-r", "--no-dereference"]).arg(&a).arg(&b).status().unwrap();
                assert!(diff.success(), "extracted contents differ");
            }
            _ => println!("mksquashfs not run (apt-get install squashfs-tools)"),
        }
    }
}
