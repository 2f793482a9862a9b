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

use crate::rootfs::{Content, Entry, Kind, Tree};
use std::collections::{BTreeSet, HashMap};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
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

/// [`write`] over any sorted list of entries, parents first; tests use it to
/// set owners, which `Tree` has no setter for.
fn write_entries<'t>(entries: impl IntoIterator<Item = (&'t str, &'t Entry)>, opts: &Options, out: &mut (impl Write + Seek)) -> Result<Stats> {
    let block_log = check_options(opts)?;
    let nodes = collect(entries)?;
    let root = nodes.iter().position(|n| n.path == "/").ok_or_else(|| SquashfsError::Entry { path: "/".into(), problem: "the tree has no root directory".into() })?;
    let (ids, id_index) = id_table(&nodes)?;
    let order = post_order(&nodes, root);
    let inode_count = u32::try_from(nodes.len()).map_err(|_| SquashfsError::TooBig(format!("{} entries; squashfs holds at most 2^32 - 2", nodes.len())))?;
    let mut ino = vec![0u32; nodes.len()];
    for (n, &i) in order.iter().enumerate() {
        ino[i] = n as u32 + 1;
    }

    let base = out.stream_position().map_err(|source| SquashfsError::Write { source })?;
    let mut sink = Sink { out, pos: 0 };
    sink.write(&[0; SUPERBLOCK_LEN as usize])?;
    let mut compressors = Vec::new();
    for _ in 0..threads() {
        compressors.push(Compressor::new(opts.compression_level).map_err(|source| SquashfsError::Compress { source })?);
    }
    let mut flags = FLAG_NO_FRAGMENTS | FLAG_NO_XATTRS;
    if opts.compression_level != ZSTD_DEFAULT_LEVEL {
        // Read by unsquashfs, ignored by the kernel; always stored raw.
        flags |= FLAG_COMP_OPTS;
        let mut block = (4 | META_RAW).to_le_bytes().to_vec();
        block.extend_from_slice(&(opts.compression_level as u32).to_le_bytes());
        sink.write(&block)?;
    }

    let mut data = DataWriter { sink, compressors, block_size: opts.block_size as usize, batch: Vec::new(), batch_bytes: 0, files: vec![FileData::default(); nodes.len()] };
    for (i, n) in nodes.iter().enumerate() {
        if let Kind::File(c) = &n.entry.kind {
            data.file(i, n.path, c)?;
        }
    }
    data.flush()?;
    let DataWriter { mut sink, mut compressors, files, .. } = data;
    let z = &mut compressors[0];

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
                    for (at, block, name) in index {
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
    Ok(Stats { bytes: padded, inodes: inode_count, files: count(|k| matches!(k, Kind::File(_))), dirs: count(|k| matches!(k, Kind::Dir)) })
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

/// Writes one directory's listing. Returns its length and the index entries
/// (listing offset, directory block, first name) that let the kernel skip to
/// the right 8 KiB of a large directory.
fn listing<'n>(dirs: &mut Meta, z: &mut Compressor, nodes: &[Node<'n>], children: &[usize], refs: &[(u32, u16)], ino: &[u32]) -> Result<(usize, Vec<(u32, u32, &'n str)>)> {
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
        put16(&mut buf, match nodes[c].entry.kind {
            Kind::Dir => T_DIR,
            Kind::File(_) => T_FILE,
            Kind::Symlink(_) => T_SYMLINK,
            Kind::CharDev(..) => T_CHR,
        });
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
        index.push((at32, block, name));
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
struct DataWriter<'o, W: Write> {
    sink: Sink<'o, W>,
    compressors: Vec<Compressor<'static>>,
    block_size: usize,
    batch: Vec<Block>,
    batch_bytes: usize,
    files: Vec<FileData>,
}

impl<W: Write> DataWriter<'_, W> {
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
                if !f.metadata().map_err(err)?.is_file() {
                    return Err(err(io::Error::new(io::ErrorKind::InvalidInput, "not a regular file")));
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
            }
        }
        Ok(())
    }

    fn push(&mut self, file: usize, data: Vec<u8>) -> Result<()> {
        self.files[file].size += data.len() as u64;
        self.batch_bytes += data.len();
        self.batch.push(Block { file, data });
        if self.batch.len() >= 4 * self.compressors.len() || self.batch_bytes >= 32 << 20 {
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
            match packed {
                None => {
                    f.blocks.push(0);
                    f.sparse += b.data.len() as u64;
                }
                Some(p) if p.len() < b.data.len() => {
                    f.blocks.push(p.len() as u32);
                    self.sink.write(&p)?;
                }
                Some(_) => {
                    f.blocks.push(b.data.len() as u32 | DATA_RAW);
                    self.sink.write(&b.data)?;
                }
            }
        }
        Ok(())
    }
}

/// Compressed blocks in batch order; `None` for an all-zero block, which is
/// stored as a hole.
fn compress_all(compressors: &mut [Compressor<'static>], batch: &[Block]) -> Result<Vec<Option<Vec<u8>>>> {
    let todo: Vec<usize> = (0..batch.len()).filter(|&i| batch[i].data.iter().any(|&b| b != 0)).collect();
    let mut packed: Vec<Option<Vec<u8>>> = vec![None; batch.len()];
    if compressors.len() == 1 || todo.len() <= 1 {
        for &i in &todo {
            packed[i] = Some(compressors[0].compress(&batch[i].data).map_err(|source| SquashfsError::Compress { source })?);
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
                        got.push((i, z.compress(&batch[i].data)));
                    }
                    got
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect::<Vec<_>>()
    });
    for (i, r) in results {
        packed[i] = Some(r.map_err(|source| SquashfsError::Compress { source })?);
    }
    Ok(packed)
}

fn read_full(f: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
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
