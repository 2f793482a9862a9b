//! The squashfs writer's [`Store`] in the kiln cache (`squashfs-blocks/`):
//! the packed blocks of the root's large files (k0s, image tarballs), so a
//! rebuild with them unchanged copies them instead of compressing them at
//! zstd 19 again. Each entry is a directory renamed into place when
//! complete: `blocks` (the block words, then the sha256 of `data`) and
//! `data`. An entry whose data does not match is ignored (and rebuilt).
//! The oldest entries go once the store passes [`LIMIT_BYTES`].

use crate::inputs::cache::Cache;
use kiln_formats::squashfs::{Pending, Store, Stored};
use sha2::{Digest, Sha256};
use std::io::{self, Write};
use std::path::PathBuf;

/// What the store may hold before its oldest entries are removed.
pub const LIMIT_BYTES: u64 = 4 << 30;

pub struct PackedStore {
    cache: Cache,
}

impl PackedStore {
    pub fn new(cache: &Cache) -> PackedStore {
        PackedStore { cache: cache.clone() }
    }

    fn dir(&self) -> PathBuf {
        self.cache.root().join("squashfs-blocks")
    }

    /// Removes the least recently used entries beyond [`LIMIT_BYTES`].
    fn prune(&self) {
        let Ok(rd) = std::fs::read_dir(self.dir()) else { return };
        let mut entries: Vec<(std::time::SystemTime, u64, PathBuf)> = rd
            .flatten()
            .filter_map(|e| {
                let data = e.path().join("data");
                let m = std::fs::metadata(e.path().join("blocks")).ok()?;
                Some((m.modified().ok()?, std::fs::metadata(&data).map_or(0, |d| d.len()), e.path()))
            })
            .collect();
        entries.sort();
        let mut total: u64 = entries.iter().map(|e| e.1).sum();
        for (_, len, path) in entries {
            if total <= LIMIT_BYTES {
                break;
            }
            if std::fs::remove_dir_all(&path).is_ok() {
                total -= len;
            }
        }
    }
}

impl Store for PackedStore {
    fn get(&self, key: &str) -> Option<Stored> {
        let dir = self.dir().join(key);
        let index = std::fs::read(dir.join("blocks")).ok()?;
        if index.len() < 32 || (index.len() - 32) % 4 != 0 {
            return None;
        }
        let (words, sum) = index.split_at(index.len() - 32);
        let blocks: Vec<u32> = words.chunks(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        // The data is read twice (checked, then copied): from the page
        // cache, that is far cheaper than compressing it.
        let mut f = std::fs::File::open(dir.join("data")).ok()?;
        let mut h = HashWriter::new(io::sink());
        io::copy(&mut f, &mut h).ok()?;
        let data_len = h.size;
        if h.hash.finalize().as_slice() != sum {
            tracing::warn!("squashfs-blocks/{key}: the stored data does not match its checksum; compressing again");
            let _ = std::fs::remove_dir_all(&dir);
            return None;
        }
        // Mark it used, for pruning.
        let _ = std::fs::File::options().append(true).open(dir.join("blocks")).and_then(|b| b.set_modified(std::time::SystemTime::now()));
        let data = std::fs::File::open(dir.join("data")).ok()?;
        Some(Stored { blocks, data: Box::new(io::BufReader::new(data)), data_len })
    }

    fn create(&self) -> io::Result<Box<dyn Pending>> {
        let tmp = self.cache.temp_dir()?;
        let data = io::BufWriter::new(std::fs::File::create(tmp.path().join("data"))?);
        Ok(Box::new(Entry { store: PackedStore::new(&self.cache), tmp, data: HashWriter::new(data) }))
    }
}

/// Passes writes through to `inner`, counting and hashing (sha256) what it
/// takes. The builder's one such writer: here, and for the test fixture's
/// files (`tools::fixture`).
pub struct HashWriter<W: Write> {
    pub inner: W,
    pub hash: Sha256,
    pub size: u64,
}

impl<W: Write> HashWriter<W> {
    pub fn new(inner: W) -> Self {
        HashWriter { inner, hash: Sha256::new(), size: 0 }
    }

    /// Flushes; returns the sha256 (hex) and the size.
    pub fn finish(mut self) -> io::Result<(String, u64)> {
        self.inner.flush()?;
        Ok((hex::encode(self.hash.finalize()), self.size))
    }
}

impl<W: Write> Write for HashWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

struct Entry {
    store: PackedStore,
    tmp: tempfile::TempDir,
    data: HashWriter<io::BufWriter<std::fs::File>>,
}

impl Write for Entry {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.data.write(b)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.data.flush()
    }
}

impl Pending for Entry {
    fn commit(mut self: Box<Self>, key: &str, blocks: &[u32]) -> io::Result<()> {
        self.data.flush()?;
        let mut index: Vec<u8> = blocks.iter().flat_map(|w| w.to_le_bytes()).collect();
        index.extend_from_slice(&self.data.hash.clone().finalize());
        std::fs::write(self.tmp.path().join("blocks"), index)?;
        let Entry { store, tmp, .. } = *self;
        let dst = store.dir().join(key);
        store.cache.commit_dir(tmp, &dst)?;
        store.prune();
        Ok(())
    }
}

/// Reads all of `r`; for tests.
#[cfg(test)]
fn read_all(mut r: impl io::Read) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_damaged_ones_are_dropped() {
        let d = tempfile::tempdir().unwrap();
        let s = PackedStore::new(&Cache::at(d.path().to_path_buf()));
        assert!(s.get("k").is_none());
        let mut e = s.create().unwrap();
        e.write_all(b"packed bytes").unwrap();
        e.commit("k", &[5, 0, 7 | (1 << 24)]).unwrap();
        let got = s.get("k").unwrap();
        assert_eq!((got.blocks.clone(), got.data_len), (vec![5, 0, 7 | (1 << 24)], 12));
        assert_eq!(read_all(got.data), b"packed bytes");
        std::fs::write(d.path().join("squashfs-blocks/k/data"), b"packed bytez").unwrap();
        assert!(s.get("k").is_none());
        assert!(!d.path().join("squashfs-blocks/k").exists());
    }
}
