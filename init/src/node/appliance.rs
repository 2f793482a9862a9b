//! Appliance payloads baked into the read-only root, placed where k0s looks
//! for them: `images/<file>` (imported by the worker) and
//! `manifests/<stack>/<file>` (applied by the controller) under its data
//! directory.
//!
//! Each file gets a symlink, made again at every boot, so nothing large is
//! copied and an image update brings its own payloads. A link kiln made
//! (one pointing into the appliance directory) that the image no longer
//! has is removed; anything else in those directories is the user's and is
//! never touched, even when it has the name of a baked file.

use super::console;
use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};

/// Where the builder puts the payloads in the root.
pub use kiln_contract::layout::APPLIANCE_SOURCE as SOURCE;

/// What one pass did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// Image links now in place (new or kept).
    pub images: usize,
    /// Manifest links now in place.
    pub manifests: usize,
    /// Stale kiln links removed.
    pub removed: usize,
    /// Paths left alone because a user's file has the baked file's name.
    pub user_files: Vec<String>,
    /// What went wrong, one line each.
    pub errors: Vec<String>,
}

/// Places the image's payloads under k0s's data directory and reports on
/// the console. Failures are warnings: k0s still starts, without them.
pub fn place_default() {
    let r = place(Path::new(SOURCE), Path::new(crate::k0s::DATA_DIR));
    for u in &r.user_files {
        console::warn(&format!("{u} is not a link kiln made; keeping it instead of the image's file of that name"));
    }
    for e in &r.errors {
        console::error(&format!("appliance: {e}"));
    }
    if r.images + r.manifests + r.removed > 0 || !r.errors.is_empty() {
        console::event("appliance-linked", &[("images", &r.images), ("manifests", &r.manifests), ("removed", &r.removed), ("errors", &r.errors.len())]);
    }
}

/// Links `source/images/*` into `data_dir/images/` and
/// `source/manifests/<stack>/*` into `data_dir/manifests/<stack>/`, and
/// removes kiln links the source no longer has.
pub fn place(source: &Path, data_dir: &Path) -> Report {
    let mut r = Report::default();
    r.images = link_dir(&source.join("images"), &data_dir.join("images"), source, &mut r);
    let stacks = entries(&source.join("manifests"), &mut r).into_iter().filter(|s| source.join("manifests").join(s).is_dir());
    let mut seen = BTreeSet::new();
    for stack in stacks {
        let dst = data_dir.join("manifests").join(&stack);
        r.manifests += link_dir(&source.join("manifests").join(&stack), &dst, source, &mut r);
        seen.insert(stack);
    }
    // Stacks the image dropped: their links go, the directory stays, so
    // that k0s applies the now empty stack and deletes what it had made.
    let manifests = data_dir.join("manifests");
    for stack in entries(&manifests, &mut r) {
        let d = manifests.join(&stack);
        if !seen.contains(&stack) && is_real_dir(&d) {
            r.removed += remove_stale(&d, &BTreeSet::new(), source, &mut r);
        }
    }
    r
}

fn is_real_dir(p: &Path) -> bool {
    std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
}

/// Names in a directory, sorted; none when it does not exist.
fn entries(dir: &Path, r: &mut Report) -> Vec<String> {
    match std::fs::read_dir(dir) {
        Ok(rd) => {
            let mut v: Vec<String> = rd.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            v.sort();
            v
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => {
            r.errors.push(format!("reading {}: {e}", dir.display()));
            Vec::new()
        }
    }
}

/// Makes `dst/<name>` a link to `src/<name>` for every file in `src`, then
/// removes kiln links in `dst` to anything else. Returns the links in place.
fn link_dir(src: &Path, dst: &Path, source: &Path, r: &mut Report) -> usize {
    let want: BTreeSet<String> = entries(src, r).into_iter().filter(|n| !src.join(n).is_dir()).collect();
    if !want.is_empty() {
        if let Err(e) = std::fs::create_dir_all(dst) {
            r.errors.push(format!("creating {}: {e}", dst.display()));
            return 0;
        }
    }
    let mut linked = 0;
    for name in &want {
        match link_one(&src.join(name), &dst.join(name), source) {
            Ok(true) => linked += 1,
            Ok(false) => r.user_files.push(dst.join(name).display().to_string()),
            Err(e) => r.errors.push(e),
        }
    }
    r.removed += remove_stale(dst, &want, source, r);
    linked
}

/// Whether a link was made by kiln: it points into the appliance source.
fn kiln_link(path: &Path, source: &Path) -> Option<PathBuf> {
    let meta = std::fs::symlink_metadata(path).ok()?;
    if !meta.file_type().is_symlink() {
        return None;
    }
    std::fs::read_link(path).ok().filter(|t| t.starts_with(source))
}

/// Ok(false) when a user's file holds the name.
fn link_one(target: &Path, link: &Path, source: &Path) -> Result<bool, String> {
    match std::fs::symlink_metadata(link) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("{}: {e}", link.display())),
        Ok(_) => match kiln_link(link, source) {
            Some(t) if t == target => return Ok(true),
            Some(_) => {}
            None => return Ok(false),
        },
    }
    // A new link beside it, renamed over: the name never goes missing.
    let tmp = link.with_file_name(format!(".{}.kiln-link", link.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(target, &tmp)
        .and_then(|_| std::fs::rename(&tmp, link))
        .map(|_| true)
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            format!("linking {} to {}: {e}", link.display(), target.display())
        })
}

/// Removes kiln links in `dir` whose names are not in `keep`.
fn remove_stale(dir: &Path, keep: &BTreeSet<String>, source: &Path, r: &mut Report) -> usize {
    let mut removed = 0;
    for name in entries(dir, r) {
        let p = dir.join(&name);
        if keep.contains(&name) || kiln_link(&p, source).is_none() {
            continue;
        }
        match std::fs::remove_file(&p) {
            Ok(()) => removed += 1,
            Err(e) => r.errors.push(format!("removing the stale link {}: {e}", p.display())),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn write(p: &Path, s: &str) {
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    fn link_of(p: &Path) -> Option<PathBuf> {
        std::fs::read_link(p).ok()
    }

    #[test]
    fn links_images_and_stacks_and_refreshes_them() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("usr/lib/kiln/appliance");
        let data = d.path().join("var/lib/k0s");
        write(&src.join("images/k0s-airgap-bundle-v1.30.14+k0s.0-amd64"), "bundle");
        write(&src.join("images/app.tar"), "app");
        write(&src.join("manifests/app/10-ns.yaml"), "kind: Namespace\n");
        write(&src.join("manifests/kiln-charts/app.yaml"), "kind: Chart\n");
        let r = place(&src, &data);
        assert_eq!(r, Report { images: 2, manifests: 2, ..Default::default() });
        assert_eq!(link_of(&data.join("images/app.tar")), Some(src.join("images/app.tar")));
        assert_eq!(std::fs::read_to_string(data.join("manifests/app/10-ns.yaml")).unwrap(), "kind: Namespace\n");
        assert!(std::fs::symlink_metadata(data.join("manifests/app")).unwrap().is_dir(), "a real stack directory, which every k0s version reads");
        // Again: nothing changes.
        assert_eq!(place(&src, &data), Report { images: 2, manifests: 2, ..Default::default() });

        // The next image drops a file and a stack, and adds one; the user
        // put files of their own beside the links.
        std::fs::remove_file(src.join("images/app.tar")).unwrap();
        std::fs::remove_dir_all(src.join("manifests/app")).unwrap();
        write(&src.join("manifests/other/a.yaml"), "a");
        write(&data.join("images/mine.tar"), "user image");
        symlink("/somewhere/else.tar", data.join("images/elsewhere.tar")).unwrap();
        write(&data.join("manifests/app/user.yaml"), "user manifest");
        write(&data.join("manifests/user-stack/x.yaml"), "x");
        let r = place(&src, &data);
        assert_eq!((r.images, r.manifests, r.removed), (1, 2, 2), "{r:?}");
        assert!(r.errors.is_empty() && r.user_files.is_empty(), "{r:?}");
        assert!(std::fs::symlink_metadata(data.join("images/app.tar")).is_err(), "stale link removed");
        assert!(std::fs::symlink_metadata(data.join("manifests/app/10-ns.yaml")).is_err());
        assert_eq!(std::fs::read_to_string(data.join("manifests/app/user.yaml")).unwrap(), "user manifest");
        assert!(data.join("manifests/app").is_dir(), "the dropped stack's directory stays, for k0s to prune");
        assert_eq!(std::fs::read_to_string(data.join("images/mine.tar")).unwrap(), "user image");
        assert_eq!(link_of(&data.join("images/elsewhere.tar")), Some(PathBuf::from("/somewhere/else.tar")));
        assert_eq!(std::fs::read_to_string(data.join("manifests/other/a.yaml")).unwrap(), "a");
        assert_eq!(std::fs::read_to_string(data.join("manifests/user-stack/x.yaml")).unwrap(), "x");
    }

    #[test]
    fn user_files_win_and_kiln_links_are_repointed() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("appliance");
        let data = d.path().join("k0s");
        write(&src.join("images/a.tar"), "a");
        write(&src.join("images/b.tar"), "b");
        write(&data.join("images/a.tar"), "the user's own a.tar");
        // A kiln link from an older layout, pointing at another file.
        std::fs::create_dir_all(src.join("old")).unwrap();
        symlink(src.join("old/b.tar"), data.join("images/b.tar")).unwrap();
        let r = place(&src, &data);
        assert_eq!(r.images, 1);
        assert_eq!(r.user_files, [data.join("images/a.tar").display().to_string()]);
        assert_eq!(std::fs::read_to_string(data.join("images/a.tar")).unwrap(), "the user's own a.tar");
        assert_eq!(link_of(&data.join("images/b.tar")), Some(src.join("images/b.tar")));
        assert!(!data.join("images/.b.tar.kiln-link").exists());
    }

    #[test]
    fn nothing_baked_leaves_no_trace() {
        let d = tempfile::tempdir().unwrap();
        let data = d.path().join("k0s");
        assert_eq!(place(&d.path().join("none"), &data), Report::default());
        assert!(!data.exists(), "no directories made for nothing");
        // An image without payloads still removes the last one's links.
        let src = d.path().join("none");
        std::fs::create_dir_all(data.join("images")).unwrap();
        symlink(src.join("images/gone.tar"), data.join("images/gone.tar")).unwrap();
        assert_eq!(place(&src, &data).removed, 1);
    }
}
