//! Update bundles ([`bundle`]: format, signature, policy) and image versions
//! ([`version`]). The builder writes bundles; kiln-init reads and applies
//! them (`kiln_init::node::update`).

pub mod bundle;
pub mod version;

pub use bundle::{BundleError, BundleReader, Manifest, Part, PartKind, Policy, KEY_PATH};
pub use version::Version;


/// The image's own version, `IMAGE_VERSION=` in /etc/os-release (set when
/// the profile has `version`).
pub fn running_version(os_release: &str) -> Option<&str> {
    os_release.lines().find_map(|l| {
        let v = l.strip_prefix("IMAGE_VERSION=")?.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v);
        Some(v).filter(|v| !v.is_empty())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn running_version_from_os_release() {
        let os = "NAME=kiln\nIMAGE_ID=edge\nIMAGE_VERSION=1.2.10\n";
        assert_eq!(super::running_version(os), Some("1.2.10"));
        assert_eq!(super::running_version("IMAGE_VERSION=\"3\"\n"), Some("3"));
        assert_eq!(super::running_version("NAME=kiln\nIMAGE_VERSION=\n"), None);
        assert_eq!(super::running_version("NAME=kiln\n"), None);
    }
}
