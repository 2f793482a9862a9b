//! kiln's TOML files (profiles, board overlays): parsing against a schema
//! with errors that name the file, the line and the key.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{path}: cannot read profile: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}:{line}: key `{key}`: {message}")]
    Invalid { path: PathBuf, line: usize, key: String, message: String },
    #[error("{path}: {message}")]
    Semantic { path: PathBuf, message: String },
    #[error("{path}: `extends` forms a cycle through {again}")]
    Cycle { path: PathBuf, again: PathBuf },
    #[error("SOURCE_DATE_EPOCH=`{value}` in the environment is not a whole number of seconds since 1970-01-01 UTC (what `date +%s` prints); fix it, or unset it to use the profile's `source_date_epoch`")]
    BadSourceDateEpoch { value: String },
}

/// The line of `leaf = …` in `[table]`, or in the n-th `[[table]]` when
/// the table is written `table[n]`.
pub fn line_in_table(src: &str, table: &str, leaf: &str) -> Option<usize> {
    let (name, index) = match table.strip_suffix(']').and_then(|t| t.rsplit_once('[')) {
        Some((n, i)) => (n, Some(i.parse::<usize>().ok()?)),
        None => (table, None),
    };
    let mut inside = false;
    let mut seen = 0usize;
    for (i, l) in src.lines().enumerate() {
        let t = l.trim();
        if let Some(h) = t.strip_prefix("[[").and_then(|h| h.strip_suffix("]]")) {
            let same = h.trim() == name;
            inside = same && index == Some(seen);
            seen += usize::from(same);
            continue;
        }
        if let Some(h) = t.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            inside = index.is_none() && h.trim() == name;
            continue;
        }
        if inside && t.split_once('=').is_some_and(|(k, _)| k.trim().trim_matches('"') == leaf) {
            return Some(i + 1);
        }
    }
    None
}

/// Parses `src` (the text of `path`) into `T`; an error names the file, the
/// line and the key, as every kiln TOML file's do (profiles, board overlays).
pub fn parse_toml<T: serde::de::DeserializeOwned>(path: &Path, src: &str) -> Result<T, ProfileError> {
    toml::from_str(src).map_err(|e| {
        let line = e.span().map(|s| kiln_contract::config::line_at(src, s.start)).unwrap_or(1);
        let message = e.message().lines().next().unwrap_or("invalid TOML").to_string();
        let key = message
            .strip_prefix("unknown field `")
            .and_then(|r| r.split('`').next())
            .map(str::to_string)
            .or_else(|| kiln_contract::config::key_at_line(src, Some(line)))
            .unwrap_or_else(|| "?".into());
        ProfileError::Invalid { path: path.to_path_buf(), line, key, message }
    })
}
