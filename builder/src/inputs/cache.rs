//! The content-addressed cache (`$XDG_CACHE_HOME/kiln`, or `KILN_CACHE_DIR`).
//!
//! Blobs live under `sha256/<hex>`; built things (kernels) under their own
//! key. Everything is written to a temp path and renamed into place, so an
//! interrupted build never leaves a half-written entry.

use std::io;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    pub fn default_location() -> Cache {
        if let Some(d) = std::env::var_os("KILN_CACHE_DIR") {
            return Cache::at(PathBuf::from(d));
        }
        let base = std::env::var_os("XDG_CACHE_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
            .unwrap_or_else(|| PathBuf::from("/tmp"));
        Cache::at(base.join("kiln"))
    }

    pub fn at(root: PathBuf) -> Cache {
        Cache { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn blob(&self, sha256: &str) -> PathBuf {
        self.root.join("sha256").join(sha256)
    }

    /// A directory for a built artifact set, by key.
    pub fn entry(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(key)
    }

    /// A working directory that persists between builds (kernel trees).
    pub fn work(&self, name: &str) -> io::Result<PathBuf> {
        let p = self.root.join("work").join(name);
        std::fs::create_dir_all(&p)?;
        Ok(p)
    }

    fn tmp_root(&self) -> io::Result<PathBuf> {
        let t = self.root.join("tmp");
        std::fs::create_dir_all(&t)?;
        Ok(t)
    }

    pub fn temp_file(&self) -> io::Result<tempfile::NamedTempFile> {
        tempfile::NamedTempFile::new_in(self.tmp_root()?)
    }

    pub fn temp_dir(&self) -> io::Result<tempfile::TempDir> {
        tempfile::TempDir::new_in(self.tmp_root()?)
    }

    /// Moves a finished temp file into the store under its hash.
    pub fn commit(&self, tmp: tempfile::NamedTempFile, sha256: &str) -> io::Result<()> {
        let dst = self.blob(sha256);
        std::fs::create_dir_all(dst.parent().unwrap_or(&self.root))?;
        tmp.persist(&dst).map_err(|e| e.error)?;
        Ok(())
    }

    /// Copies a file into the store under its (already checked) hash.
    pub fn put_file(&self, src: &Path, sha256: &str) -> io::Result<()> {
        let tmp = self.temp_file()?;
        std::fs::copy(src, tmp.path())?;
        self.commit(tmp, sha256)
    }

    /// Moves a finished temp directory into place as a cache entry.
    pub fn commit_dir(&self, tmp: tempfile::TempDir, dst: &Path) -> io::Result<()> {
        std::fs::create_dir_all(dst.parent().unwrap_or(&self.root))?;
        if dst.exists() {
            std::fs::remove_dir_all(dst)?;
        }
        let p = tmp.keep();
        std::fs::rename(&p, dst)
    }

    pub fn index_path(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join("index").join(kind).join(kiln_contract::digest::hex(&kiln_contract::digest::sha256(key.as_bytes())))
    }

    pub fn write_index(&self, path: &Path, value: &str) -> io::Result<()> {
        std::fs::create_dir_all(path.parent().unwrap_or(&self.root))?;
        let tmp = self.temp_file()?;
        std::fs::write(tmp.path(), value)?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}
