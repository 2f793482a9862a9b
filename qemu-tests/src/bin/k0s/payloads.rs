//! What k0s would import and apply from its data directory: every file in
//! `images/` (image tarballs) and in `manifests/<stack>/`. One line each,
//! with its size and a sha256 prefix as read through any symlink, so a test
//! can compare them with what it baked into the image.

use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::path::Path;

use crate::out::say;

/// The first 12 hex digits of the sha256 of a file, and its size.
pub fn digest(path: &Path) -> Result<(u64, String), String> {
    let mut f = fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if r == 0 {
            break;
        }
        n += r as u64;
        h.update(&buf[..r]);
    }
    let hex: String = h.finalize().iter().take(6).map(|b| format!("{b:02x}")).collect();
    Ok((n, hex))
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// One line for a file: `<what> <name> bytes=N sha256=<prefix> link=<target>`.
fn show(what: &str, shown: &str, path: &Path, bad: &mut Vec<String>) {
    let link = fs::read_link(path).map_or_else(|_| "none".to_string(), |t| t.display().to_string());
    match digest(path) {
        Ok((n, hex)) => say(&format!("{what} {shown} bytes={n} sha256={hex} link={link}")),
        Err(e) => {
            say(&format!("{what} {shown} unreadable link={link}"));
            bad.push(e);
        }
    }
}

/// Lists images/* and manifests/*/* under the data directory; fails when
/// one cannot be read (k0s would fail to import or apply it).
pub fn data_dir_payloads(data_dir: &str) -> Result<(), String> {
    let dir = Path::new(data_dir);
    let mut bad = Vec::new();
    let (mut images, mut manifests) = (0, 0);
    for name in names(&dir.join("images")) {
        images += 1;
        show("image", &name, &dir.join("images").join(&name), &mut bad);
    }
    for stack in names(&dir.join("manifests")) {
        let sd = dir.join("manifests").join(&stack);
        if !sd.is_dir() {
            continue;
        }
        for name in names(&sd) {
            manifests += 1;
            show("manifest", &format!("{stack}/{name}"), &sd.join(&name), &mut bad);
        }
    }
    say(&format!("payloads images={images} manifests={manifests}"));
    if bad.is_empty() {
        Ok(())
    } else {
        Err(bad.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_and_listing() {
        let d = std::env::temp_dir().join(format!("stand-in-payloads-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(d.join("images")).unwrap();
        fs::create_dir_all(d.join("manifests/app")).unwrap();
        fs::write(d.join("images/a.tar"), b"abc").unwrap();
        // sha256("abc") = ba7816bf8f01…
        assert_eq!(digest(&d.join("images/a.tar")).unwrap(), (3, "ba7816bf8f01".to_string()));
        fs::write(d.join("real.yaml"), b"kind: X\n").unwrap();
        std::os::unix::fs::symlink(d.join("real.yaml"), d.join("manifests/app/x.yaml")).unwrap();
        assert!(data_dir_payloads(d.to_str().unwrap()).is_ok());
        std::os::unix::fs::symlink("/nonexistent/b.tar", d.join("images/b.tar")).unwrap();
        let e = data_dir_payloads(d.to_str().unwrap()).unwrap_err();
        assert!(e.contains("b.tar"), "{e}");
        assert!(data_dir_payloads("/nonexistent-data-dir").is_ok(), "nothing baked is fine");
        let _ = fs::remove_dir_all(&d);
    }
}
