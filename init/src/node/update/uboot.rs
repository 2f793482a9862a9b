//! Reading and writing a u-boot card's `/kiln/state` on the mounted boot FAT
//! (format: `kiln_contract::uboot`). The file keeps one length so that it is
//! rewritten in place: a power cut leaves the old or the new state.

use crate::node::sys;
pub use kiln_contract::uboot::*;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Reads `<boot>/kiln/state`; Ok(None) when it is missing or names no good
/// slot.
pub fn read_state(boot: &Path) -> io::Result<Option<State>> {
    match fs::read(boot.join(STATE)) {
        Ok(b) => Ok(State::parse(&String::from_utf8_lossy(&b))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Writes `<boot>/kiln/state` and syncs it: in place when the file has the
/// usual length (see the module docs), else through a temporary file and a
/// rename.
pub fn write_state(boot: &Path, s: &State) -> io::Result<()> {
    let path = boot.join(STATE);
    let text = s.to_text();
    if let Ok(f) = OpenOptions::new().write(true).open(&path) {
        if f.metadata()?.len() == text.len() as u64 {
            f.write_all_at(text.as_bytes(), 0)?;
            return f.sync_all();
        }
    }
    let dir = path.parent().unwrap_or(boot);
    fs::create_dir_all(dir)?;
    let tmp = dir.join(".state.tmp");
    fs::write(&tmp, text.as_bytes())?;
    File::open(&tmp)?.sync_all()?;
    sys::rename_synced(&tmp, &path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_contract::layout::Slot;
    use kiln_contract::uboot::STATE_LEN;

    #[test]
    fn state_is_rewritten_in_place() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(read_state(d.path()).unwrap(), None);
        let trial = State { good: Slot::A, trial: Some((Slot::B, 2)) };
        write_state(d.path(), &trial).unwrap();
        assert_eq!(read_state(d.path()).unwrap(), Some(trial));
        let path = d.path().join(STATE);
        let ino = std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap());
        let good = State { good: Slot::B, trial: None };
        write_state(d.path(), &good).unwrap();
        assert_eq!(read_state(d.path()).unwrap(), Some(good));
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&fs::metadata(&path).unwrap()), ino, "rewritten in place");
        // A file of another length (an old or hand-made one) is replaced.
        fs::write(&path, "kiln_good=a\n").unwrap();
        write_state(d.path(), &trial).unwrap();
        assert_eq!(fs::read(&path).unwrap().len(), STATE_LEN);
        assert_eq!(fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
    }
}
