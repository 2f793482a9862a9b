//! The update channel client: what a channel offers, and the bundle it
//! points at, streamed and checked against the channel's sha256.
//!
//! A channel is a folder on a plain HTTP server. The node reads
//! `<server>/<channel>/index.yaml` (`[update] server` and `channel` in
//! node.toml), for example `http://10.0.2.2:8080/kiln/stable/index.yaml`.
//! Its shape follows k0s autopilot's update channels (a `version` and, per
//! platform, a URL and a sha256, as in a k0s autopilot plan's
//! `platforms:`):
//!
//! ```yaml
//! # kiln update channel "stable"
//! version: 1.4.2
//! platforms:
//!   linux-amd64:
//!     url: 1.4.2/amd64/update.kiln
//!     sha256: 3f0a…(64 hex digits)
//!   linux-arm64:
//!     url: http://10.0.2.2:8080/kiln/stable/1.4.2/arm64/update.kiln
//!     sha256: "9b1c…"
//!   linux-arm:
//!     url: '1.4.2/armv7/update.kiln'
//!     sha256: 0d4e…
//! ```
//!
//! - `version` (required): the image version the channel offers,
//!   dot-separated whole numbers (see `kiln_contract::update::version`).
//! - `platforms` (required): one entry a platform; kiln's architectures map
//!   to k0s's platform names: `amd64` → `linux-amd64`, `arm64` →
//!   `linux-arm64`, `armv7` → `linux-arm`. Other platform names are allowed
//!   and ignored by nodes that do not run them.
//! - `url` (required): the platform's `update.kiln`, an `http://` URL or a
//!   path relative to index.yaml's own URL (resolved like a link in a web
//!   page: `1.4.2/amd64/update.kiln`, `/kiln/bundles/x.kiln`).
//! - `sha256` (required): 64 hex digits, the digest of that `update.kiln`.
//! - Any other key, at the top or inside a platform (k0s's `channel`,
//!   `eolDate`, `downloadURLs`, …), is ignored, with whatever is nested
//!   under it.
//!
//! The file is read by a small strict parser for this subset of YAML:
//! `key: value` mappings nested by indentation with spaces (no tabs), plain,
//! "double-quoted" (escapes `\"`, `\\`, `\/` only) or 'single-quoted'
//! values, `#` comments and an optional leading `---`. A key appears once
//! in its mapping. Lists, `{flow}` values, anchors and block scalars are
//! refused where kiln reads them (they may appear under ignored keys).
//! index.yaml is at most 64 KiB.
//!
//! The bundle is never held in memory: [`open_bundle`] hands out a reader
//! over the HTTP body that hashes what it passes and fails at the end of
//! the body if the sha256 differs from the index's or the body is short, so
//! [`super::BundleReader`] fails before anything is switched.

use std::io::{self, BufRead, BufReader, Cursor, ErrorKind, Read};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use kiln_contract::update::Version;
use crate::node::fetch::{self, BodyLength, FetchError, Url};

/// The channel index's file name inside the channel's folder.
pub const INDEX_FILE: &str = "index.yaml";
/// The largest index.yaml accepted.
pub const MAX_INDEX: usize = 64 << 10;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("index.yaml line {line}: {what}")]
    Syntax { line: usize, what: String },
    #[error("index.yaml: {0}")]
    Index(String),
    #[error("the channel has no build for {platform} ({arch}); its index.yaml offers {offered}")]
    NoBuild {
        platform: String,
        arch: String,
        offered: String,
    },
    #[error("unknown architecture {0:?}: kiln builds amd64, arm64 and armv7")]
    Arch(String),
    #[error("{url}: {err}")]
    Fetch { url: String, err: FetchError },
}

impl ChannelError {
    /// What to do about it, for the console.
    pub fn hint(&self) -> &'static str {
        match self {
            ChannelError::Syntax { .. } | ChannelError::Index(_) => {
                "fix the channel's index.yaml on the update server (its shape is in the kiln docs: version, and platforms with url and sha256)"
            }
            ChannelError::NoBuild { .. } => {
                "publish an update.kiln built for this node's architecture in the channel, or move this node to another channel"
            }
            ChannelError::Arch(_) => "this node's architecture has no kiln update channel builds",
            ChannelError::Fetch { err, .. } => match err {
                FetchError::BadUrl(_) => {
                    "fix [update] server in node.toml or the url in the channel's index.yaml"
                }
                FetchError::Status { code: 404, .. } => {
                    "check [update] server and channel in node.toml, and that the channel's folder holds index.yaml and the bundles it names"
                }
                FetchError::TooLarge(_) => "index.yaml is a small file (at most 64 KiB); check [update] server",
                other => other.hint(),
            },
        }
    }
}

/// A parsed index.yaml.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Index {
    pub version: String,
    pub platforms: Vec<Platform>,
}

/// One entry of `platforms:`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Platform {
    /// `linux-amd64`, …
    pub name: String,
    /// As written, until [`Index::resolve`] makes it absolute.
    pub url: String,
    pub sha256: [u8; 32],
}

/// What the channel offers this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub version: String,
    pub url: String,
    pub sha256: [u8; 32],
}

/// The k0s platform name of a kiln architecture.
pub fn platform_of(arch: &str) -> Result<&'static str, ChannelError> {
    match arch {
        "amd64" => Ok("linux-amd64"),
        "arm64" => Ok("linux-arm64"),
        "armv7" => Ok("linux-arm"),
        _ => Err(ChannelError::Arch(arch.to_string())),
    }
}

/// The kiln architecture this binary was built for.
pub fn this_arch() -> &'static str {
    if cfg!(target_arch = "x86_64") {
        "amd64"
    } else if cfg!(target_arch = "aarch64") {
        "arm64"
    } else if cfg!(target_arch = "arm") {
        "armv7"
    } else {
        std::env::consts::ARCH
    }
}

impl Index {
    /// The offer for a kiln architecture (`amd64`, `arm64`, `armv7`).
    pub fn for_arch(&self, arch: &str) -> Result<Offer, ChannelError> {
        let platform = platform_of(arch)?;
        match self.platforms.iter().find(|p| p.name == platform) {
            Some(p) => Ok(Offer {
                version: self.version.clone(),
                url: p.url.clone(),
                sha256: p.sha256,
            }),
            None => Err(ChannelError::NoBuild {
                platform: platform.to_string(),
                arch: arch.to_string(),
                offered: if self.platforms.is_empty() {
                    "nothing".into()
                } else {
                    self.platforms
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                },
            }),
        }
    }

    /// Makes every platform URL absolute, relative ones against the URL
    /// index.yaml was fetched from.
    pub fn resolve(&mut self, index_url: &str) -> Result<(), ChannelError> {
        let fetch_err = |url: &str, err| ChannelError::Fetch {
            url: url.to_string(),
            err,
        };
        let base = Url::parse(index_url).map_err(|e| fetch_err(index_url, e))?;
        for p in &mut self.platforms {
            // The index may name an http:// mirror from an https:// one: a
            // bundle is pinned by the index's sha256 and signed, and holds
            // no secrets. Redirects still never go down to http://.
            let joined = base.join_any(&p.url).map_err(|e| {
                ChannelError::Index(format!("the url of {} ({}): {e}", p.name, p.url))
            })?;
            p.url = joined.to_string();
        }
        Ok(())
    }
}

/// `<server>/<channel>/index.yaml`.
pub fn index_url(server: &str, channel: &str) -> String {
    format!(
        "{}/{}/{INDEX_FILE}",
        server.trim_end_matches('/'),
        channel.trim_matches('/')
    )
}

/// GETs and parses the channel's index.yaml, with relative URLs resolved.
/// `opts.max_body` is capped to [`MAX_INDEX`].
pub fn fetch_index(
    server: &str,
    channel: &str,
    opts: &fetch::Options,
) -> Result<Index, ChannelError> {
    let url = index_url(server, channel);
    let opts = fetch::Options {
        max_body: opts.max_body.min(MAX_INDEX),
        ..opts.clone()
    };
    let body = fetch::get(&url, &opts).map_err(|err| ChannelError::Fetch {
        url: url.clone(),
        err,
    })?;
    let text = String::from_utf8(body)
        .map_err(|_| ChannelError::Index(format!("{url} is not UTF-8 text")))?;
    let mut index = parse_index(&text)?;
    index.resolve(&url)?;
    Ok(index)
}

/// Whether the offered version is newer than the running one. A version
/// that does not parse is never newer (nor is anything newer than it): the
/// node does not update into, or out of, what it cannot compare.
pub fn newer(offer_version: &str, running_version: &str) -> bool {
    match (
        Version::parse(offer_version),
        Version::parse(running_version),
    ) {
        (Ok(o), Ok(r)) => o > r,
        _ => false,
    }
}

pub use kiln_contract::digest::hex;

// ---------------------------------------------------------------------------
// index.yaml

struct Line<'a> {
    no: usize,
    indent: usize,
    text: &'a str,
}

fn syntax(line: usize, what: impl Into<String>) -> ChannelError {
    ChannelError::Syntax {
        line,
        what: what.into(),
    }
}

/// Parses index.yaml (the shape is in this module's documentation). URLs
/// are kept as written; [`Index::resolve`] makes relative ones absolute.
pub fn parse_index(text: &str) -> Result<Index, ChannelError> {
    let lines = content_lines(text)?;
    if let Some(l) = lines.first().filter(|l| l.indent != 0) {
        return Err(syntax(
            l.no,
            format!(
                "indented by {} spaces, but no `key:` above it opens a block",
                l.indent
            ),
        ));
    }
    let mut version = None;
    let mut platforms = None;
    for e in entries(&lines, "the top-level keys")? {
        match e.key {
            "version" => {
                no_block(&e)?;
                let v = scalar(e.no, e.rest)?.ok_or_else(|| {
                    syntax(e.no, "`version` has no value; write e.g. `version: 1.4.2`")
                })?;
                Version::parse(&v).map_err(|why| syntax(e.no, why))?;
                version = Some(v);
            }
            "platforms" => {
                if scalar(e.no, e.rest)?.is_some() {
                    return Err(syntax(
                        e.no,
                        "`platforms` opens a block: put each platform on its own line below it, indented (`  linux-amd64:`)",
                    ));
                }
                platforms = Some(parse_platforms(e.no, e.block)?);
            }
            // Other keys (k0s's `channel`, `eolDate`, …) are ignored.
            _ => {}
        }
    }
    let version = version.ok_or_else(|| {
        ChannelError::Index("there is no `version:` (the version the channel offers)".into())
    })?;
    let platforms = platforms.ok_or_else(|| {
        ChannelError::Index(
            "there is no `platforms:` (a url and sha256 for each of linux-amd64, linux-arm64, linux-arm)"
                .into(),
        )
    })?;
    Ok(Index { version, platforms })
}

/// A `key: rest` line and the block under it.
struct Entry<'t, 'a> {
    no: usize,
    key: &'a str,
    rest: &'a str,
    block: &'t [Line<'a>],
}

/// Splits the lines of one mapping into its entries, each with the lines
/// nested under it: deeper lines, and list items at the key's own
/// indentation (YAML allows `key:\n- item`). `level` names the keys in
/// errors. Keys appear once.
fn entries<'t, 'a>(lines: &'t [Line<'a>], level: &str) -> Result<Vec<Entry<'t, 'a>>, ChannelError> {
    let Some(indent) = lines.first().map(|l| l.indent) else {
        return Ok(Vec::new());
    };
    let mut out: Vec<Entry> = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let l = &lines[i];
        if l.indent != indent {
            return Err(syntax(
                l.no,
                format!(
                    "indented by {} spaces, but {level} above are indented by {indent}",
                    l.indent
                ),
            ));
        }
        let (key, rest) = split_key(l)?;
        if let Some(seen) = out.iter().find(|e| e.key == key) {
            return Err(syntax(
                l.no,
                format!("`{key}` appears twice (first on line {})", seen.no),
            ));
        }
        let mut j = i + 1;
        while j < lines.len()
            && (lines[j].indent > indent || (lines[j].indent == indent && is_item(lines[j].text)))
        {
            j += 1;
        }
        out.push(Entry {
            no: l.no,
            key,
            rest,
            block: &lines[i + 1..j],
        });
        i = j;
    }
    Ok(out)
}

/// Refuses a block under a key that takes one value.
fn no_block(e: &Entry) -> Result<(), ChannelError> {
    match e.block.first() {
        Some(b) => Err(syntax(
            b.no,
            format!(
                "`{}` takes one value on its own line, not a nested block",
                e.key
            ),
        )),
        None => Ok(()),
    }
}

fn content_lines(text: &str) -> Result<Vec<Line<'_>>, ChannelError> {
    let mut out = Vec::new();
    for (n, raw) in text.split('\n').enumerate() {
        let no = n + 1;
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        let body = raw.trim_start_matches([' ', '\t']);
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let lead = &raw[..raw.len() - body.len()];
        if lead.contains('\t') {
            return Err(syntax(no, "a tab in the indentation; indent with spaces"));
        }
        if out.is_empty() && lead.is_empty() && body.trim_end() == "---" {
            continue;
        }
        out.push(Line {
            no,
            indent: lead.len(),
            text: body.trim_end(),
        });
    }
    Ok(out)
}

fn is_item(text: &str) -> bool {
    text == "-" || text.starts_with("- ")
}

/// Splits `key: rest`.
fn split_key<'a>(l: &Line<'a>) -> Result<(&'a str, &'a str), ChannelError> {
    let t = l.text;
    if is_item(t) {
        return Err(syntax(
            l.no,
            "a list item (`- `) where a `key: value` line was expected; kiln reads mappings only here",
        ));
    }
    if t.starts_with(['"', '\'', '{', '[', '?']) {
        return Err(syntax(
            l.no,
            format!("{t:?}: expected a plain `key: value` line"),
        ));
    }
    let b = t.as_bytes();
    let at = (0..b.len()).find(|&i| b[i] == b':' && (i + 1 == b.len() || b[i + 1] == b' '));
    let Some(at) = at else {
        return Err(syntax(
            l.no,
            format!("{t:?} is not a `key: value` line (a key ends with `:` and a space)"),
        ));
    };
    let key = t[..at].trim_end();
    if key.contains(" #") {
        return Err(syntax(l.no, format!("{t:?} is not a `key: value` line")));
    }
    Ok((key, &t[at + 1..]))
}

/// A plain or quoted value; `None` for nothing (or only a comment).
fn scalar(no: usize, rest: &str) -> Result<Option<String>, ChannelError> {
    let s = rest.trim();
    if s.is_empty() || s.starts_with('#') {
        return Ok(None);
    }
    let after_quote = |tail: &str| -> Result<(), ChannelError> {
        let tail = tail.trim();
        if tail.is_empty() || tail.starts_with('#') {
            Ok(())
        } else {
            Err(syntax(
                no,
                format!("{tail:?} after the closing quote; put a comment after ` #`"),
            ))
        }
    };
    if let Some(q) = s.strip_prefix('"') {
        let mut out = String::new();
        let mut chars = q.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    after_quote(&q[i + 1..])?;
                    return Ok(Some(out));
                }
                '\\' => match chars.next().map(|(_, c)| c) {
                    Some('"') => out.push('"'),
                    Some('\\') => out.push('\\'),
                    Some('/') => out.push('/'),
                    Some(e) => {
                        return Err(syntax(
                            no,
                            format!("the escape \\{e} is not supported in index.yaml"),
                        ))
                    }
                    None => break,
                },
                c => out.push(c),
            }
        }
        return Err(syntax(no, "a \"quoted value without its closing quote"));
    }
    if let Some(q) = s.strip_prefix('\'') {
        let mut out = String::new();
        let mut chars = q.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '\'' {
                if chars.peek().map(|&(_, c)| c) == Some('\'') {
                    chars.next();
                    out.push('\'');
                    continue;
                }
                after_quote(&q[i + 1..])?;
                return Ok(Some(out));
            }
            out.push(c);
        }
        return Err(syntax(no, "a 'quoted value without its closing quote"));
    }
    if s.starts_with(['{', '[', '&', '*', '!', '|', '>', '%', '@', '`']) {
        return Err(syntax(
            no,
            format!(
                "{s:?}: flow collections, anchors, tags and block scalars are not supported in index.yaml; write a plain or quoted value"
            ),
        ));
    }
    let v = match s.find(" #") {
        Some(i) => s[..i].trim_end(),
        None => s,
    };
    if v.contains(": ") {
        return Err(syntax(no, format!("{v:?} contains `: `; quote the value")));
    }
    Ok(Some(v.to_string()))
}

fn parse_platforms(key_line: usize, block: &[Line]) -> Result<Vec<Platform>, ChannelError> {
    let Some(first) = block.first() else {
        return Err(syntax(key_line, "`platforms` is empty"));
    };
    if first.indent == 0 {
        return Err(syntax(
            first.no,
            "`platforms` is a list here; write a mapping of platform names (`  linux-amd64:` with `url:` and `sha256:` below it)",
        ));
    }
    entries(block, "the platform names")?
        .iter()
        .map(|e| {
            if scalar(e.no, e.rest)?.is_some() {
                return Err(syntax(
                    e.no,
                    format!(
                        "`{}` needs `url:` and `sha256:` on the lines below it, indented further",
                        e.key
                    ),
                ));
            }
            parse_platform(e)
        })
        .collect()
}

fn parse_platform(p: &Entry) -> Result<Platform, ChannelError> {
    let name = p.key;
    let mut url = None;
    let mut sha256 = None;
    for e in entries(p.block, &format!("the keys of `{name}`"))? {
        match e.key {
            "url" => {
                no_block(&e)?;
                let v = scalar(e.no, e.rest)?
                    .ok_or_else(|| syntax(e.no, format!("`url` of `{name}` has no value")))?;
                if v.contains("://") || v.starts_with("//") {
                    Url::parse(&v)
                        .map_err(|err| syntax(e.no, format!("url of `{name}`: {err}")))?;
                } else if let Some(c) = v.chars().find(|c| c.is_control() || c.is_whitespace()) {
                    return Err(syntax(
                        e.no,
                        format!("url of `{name}` contains {c:?}; percent-encode it"),
                    ));
                }
                url = Some(v);
            }
            "sha256" => {
                no_block(&e)?;
                let v = scalar(e.no, e.rest)?
                    .ok_or_else(|| syntax(e.no, format!("`sha256` of `{name}` has no value")))?;
                sha256 = Some(parse_sha256(&v).ok_or_else(|| {
                    syntax(
                        e.no,
                        format!(
                            "sha256 of `{name}` is not 64 hex digits (it is {v:?}, {} characters); write the output of `sha256sum update.kiln`",
                            v.chars().count()
                        ),
                    )
                })?);
            }
            // Other fields, with anything nested under them, are ignored.
            _ => {}
        }
    }
    let url = url.ok_or_else(|| syntax(p.no, format!("`{name}` has no `url:`")))?;
    let sha256 = sha256.ok_or_else(|| syntax(p.no, format!("`{name}` has no `sha256:`")))?;
    Ok(Platform {
        name: name.to_string(),
        url,
        sha256,
    })
}

fn parse_sha256(s: &str) -> Option<[u8; 32]> {
    let b = s.as_bytes();
    if b.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in b.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

// ---------------------------------------------------------------------------
// The bundle, streamed

/// How the body's end is known.
enum Framing {
    Length {
        left: u64,
        total: u64,
    },
    /// `left` bytes of the current chunk; `started` once a chunk was read
    /// (its CRLF comes before the next size line).
    Chunked {
        left: u64,
        started: bool,
    },
    UntilClose,
}

/// A reader over an update bundle's HTTP body; see [`open_bundle`].
pub struct BundleStream {
    url: String,
    want: [u8; 32],
    body: BufReader<io::Chain<Cursor<Vec<u8>>, fetch::Conn>>,
    framing: Framing,
    hasher: Sha256,
    read: u64,
    read_timeout: Duration,
    /// Set when the body ended: `Ok` if the digest matched.
    end: Option<Result<(), String>>,
}

/// GETs the offer's bundle and returns a reader over its body, chunk by
/// chunk, never the whole body in memory. Redirects (up to 5) are
/// followed. `opts.connect_timeout` and `opts.total_timeout` bound getting
/// the answer's head; then each read waits at most `opts.read_timeout`
/// (a bundle is large: there is no limit on the whole download, nor is
/// `opts.max_body` applied).
///
/// Reading fails with [`ErrorKind::InvalidData`] at the end of the body if
/// its sha256 differs from the offer's, and with
/// [`ErrorKind::UnexpectedEof`] if the body is shorter than announced.
pub fn open_bundle(offer: &Offer, opts: &fetch::Options) -> Result<BundleStream, ChannelError> {
    let fail = |url: &Url, err| ChannelError::Fetch {
        url: url.to_string(),
        err,
    };
    let deadline = Instant::now() + opts.total_timeout;
    let mut url = Url::parse(&offer.url).map_err(|err| ChannelError::Fetch {
        url: offer.url.clone(),
        err,
    })?;
    for _ in 0..=fetch::MAX_REDIRECTS {
        let (stream, (code, reason, headers), rest) =
            answer_head(&url, opts, deadline).map_err(|e| fail(&url, e))?;
        match code {
            200..=299 => {
                let framing = match fetch::body_length(code, &headers) {
                    Ok(BodyLength::Bytes(n)) => Framing::Length { left: n, total: n },
                    Ok(BodyLength::Chunked) => Framing::Chunked {
                        left: 0,
                        started: false,
                    },
                    Ok(BodyLength::UntilClose) => Framing::UntilClose,
                    Err(e) => return Err(fail(&url, e)),
                };
                let _ =
                    stream.set_read_timeout(Some(opts.read_timeout.max(Duration::from_millis(1))));
                return Ok(BundleStream {
                    url: offer.url.clone(),
                    want: offer.sha256,
                    body: BufReader::with_capacity(64 << 10, Cursor::new(rest).chain(stream)),
                    framing,
                    hasher: Sha256::new(),
                    read: 0,
                    read_timeout: opts.read_timeout,
                    end: None,
                });
            }
            301 | 302 | 303 | 307 | 308 => {
                let loc = headers
                    .iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case("location"));
                let (_, loc) = loc.ok_or_else(|| {
                    fail(
                        &url,
                        FetchError::Malformed(format!("{code} redirect without a Location")),
                    )
                })?;
                url = url.join(loc).map_err(|e| fail(&url, e))?;
            }
            code => return Err(fail(&url, FetchError::Status { code, reason })),
        }
    }
    Err(fail(&url, FetchError::TooManyRedirects))
}

/// Sends the request and reads up to the end of the answer's head (interim
/// 1xx answers skipped). Returns the connection, the head and the body
/// bytes already received.
fn answer_head(
    url: &Url,
    opts: &fetch::Options,
    deadline: Instant,
) -> Result<(fetch::Conn, fetch::Head, Vec<u8>), FetchError> {
    let mut stream = fetch::send_request(url, opts, deadline)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some((head_len, body_at)) = fetch::head_end(&buf) {
            if head_len > fetch::MAX_HEAD {
                break;
            }
            let head = fetch::parse_head(&buf[..head_len])?;
            if (100..200).contains(&head.0) && head.0 != 101 {
                buf.drain(..body_at);
                continue;
            }
            let rest = buf.split_off(body_at);
            return Ok((stream, head, rest));
        }
        if buf.len() > fetch::MAX_HEAD {
            return Err(FetchError::Malformed(format!(
                "headers longer than {} KiB",
                fetch::MAX_HEAD >> 10
            )));
        }
        let n = fetch::read_answer(&mut stream, &mut chunk, opts, deadline)?;
        if n == 0 {
            return Err(FetchError::Truncated(if buf.is_empty() {
                "no answer at all (connection closed)".into()
            } else {
                "the headers are incomplete".into()
            }));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

impl std::fmt::Debug for BundleStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BundleStream")
            .field("url", &self.url)
            .field("read", &self.read)
            .finish_non_exhaustive()
    }
}

impl BundleStream {
    /// The bytes of body passed on so far.
    pub fn bytes_read(&self) -> u64 {
        self.read
    }

    fn io_err(&self, e: io::Error) -> io::Error {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => io::Error::new(
                ErrorKind::TimedOut,
                format!(
                    "the bundle from {}: no data for {} s after {} bytes",
                    self.url,
                    self.read_timeout.as_secs_f32(),
                    self.read
                ),
            ),
            _ => io::Error::new(
                e.kind(),
                format!("reading the bundle from {}: {e}", self.url),
            ),
        }
    }

    fn truncated(&self, what: String) -> io::Error {
        io::Error::new(
            ErrorKind::UnexpectedEof,
            format!(
                "the bundle from {} is truncated: {what}; the server or the network dropped the connection",
                self.url
            ),
        )
    }

    fn malformed(&self, what: String) -> io::Error {
        io::Error::new(
            ErrorKind::InvalidData,
            format!(
                "the bundle from {}: malformed chunked body: {what}",
                self.url
            ),
        )
    }

    /// One line of chunk framing (size line or trailer), without its end.
    fn framing_line(&mut self) -> io::Result<String> {
        let mut line = Vec::new();
        (&mut self.body)
            .take(1025)
            .read_until(b'\n', &mut line)
            .map_err(|e| self.io_err(e))?;
        if !line.ends_with(b"\n") {
            if line.len() > 1024 {
                return Err(self.malformed("chunk size line too long".into()));
            }
            return Err(self.truncated(format!(
                "the chunked body has no last chunk after {} bytes",
                self.read
            )));
        }
        line.pop();
        if line.last() == Some(&b'\r') {
            line.pop();
        }
        Ok(String::from_utf8_lossy(&line).into_owned())
    }

    /// Positions on the next data byte; false at the end of the body.
    fn next_chunk(&mut self) -> io::Result<bool> {
        let Framing::Chunked { started, .. } = self.framing else {
            return Ok(true);
        };
        if started {
            let l = self.framing_line()?;
            if !l.is_empty() {
                return Err(self.malformed("chunk data longer than its size".into()));
            }
        }
        let l = self.framing_line()?;
        let size_text = l.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size_text, 16)
            .map_err(|_| self.malformed(format!("chunk size {size_text:?} is not hexadecimal")))?;
        if size == 0 {
            // Trailers, up to the blank line.
            while !self.framing_line()?.is_empty() {}
            return Ok(false);
        }
        self.framing = Framing::Chunked {
            left: size,
            started: true,
        };
        Ok(true)
    }

    /// The body ended: compare digests, once.
    fn finish(&mut self) -> io::Result<usize> {
        if self.end.is_none() {
            let got: [u8; 32] = std::mem::take(&mut self.hasher).finalize().into();
            self.end = Some(if got == self.want {
                Ok(())
            } else {
                Err(format!(
                    "the bundle from {} has sha256 {}, but the channel's index.yaml says {}",
                    self.url,
                    hex(&got),
                    hex(&self.want)
                ))
            });
        }
        match &self.end {
            Some(Err(m)) => Err(io::Error::new(ErrorKind::InvalidData, m.clone())),
            _ => Ok(0),
        }
    }
}

impl Read for BundleStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.end.is_some() {
            return self.finish();
        }
        if buf.is_empty() {
            return Ok(0);
        }
        let cap = match self.framing {
            Framing::Length { left: 0, .. } => return self.finish(),
            Framing::Length { left, .. } => left,
            Framing::Chunked { left: 0, .. } => {
                if !self.next_chunk()? {
                    return self.finish();
                }
                match self.framing {
                    Framing::Chunked { left, .. } => left,
                    _ => unreachable!("chunked framing stays chunked"),
                }
            }
            Framing::Chunked { left, .. } => left,
            Framing::UntilClose => u64::MAX,
        };
        let want = buf.len().min(usize::try_from(cap).unwrap_or(usize::MAX));
        let n = loop {
            match self.body.read(&mut buf[..want]) {
                Ok(n) => break n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(self.io_err(e)),
            }
        };
        if n == 0 {
            return match self.framing {
                Framing::Length { left, total } => Err(self.truncated(format!(
                    "got {} of the {total} bytes announced ({left} missing)",
                    total - left
                ))),
                Framing::Chunked { .. } => Err(self.truncated(format!(
                    "the connection closed inside a chunk after {} bytes",
                    self.read
                ))),
                Framing::UntilClose => self.finish(),
            };
        }
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        match &mut self.framing {
            Framing::Length { left, .. } | Framing::Chunked { left, .. } => *left -= n as u64,
            Framing::UntilClose => {}
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::TcpListener;
    use std::sync::mpsc;
    use std::sync::{Arc, Mutex};
    use std::thread;

    const A: &str = "3f0a3f0a3f0a3f0a3f0a3f0a3f0a3f0a3f0a3f0a3f0a3f0a3f0a3f0a3f0a3f0a";
    const B: &str = "9B1C9B1C9B1C9B1C9B1C9B1C9B1C9B1C9B1C9B1C9B1C9B1C9B1C9B1C9B1C9B1C";

    fn good() -> String {
        format!(
            "# kiln update channel \"stable\"\n---\nchannel: stable   # k0s's field, ignored\neolDate: \"2027-06-28\"\nversion: 1.4.2\nplatforms:\n  linux-amd64:\n    url: http://10.0.2.2:8080/kiln/stable/1.4.2/amd64/update.kiln\n    sha256: {A}\n\n  linux-arm64:   # comment\n    sha256: \"{B}\"\n    url: \"1.4.2/arm64/update.kiln\"\n    size: 123\n    mirrors:\n    - http://mirror/a.kiln\n    - x: 1\n      y: 2\n  linux-arm:\n    url: '/kiln/it''s/armv7/update.kiln' # quoted\n    sha256: '{A}'\ndownloadURLs:\n- arch: amd64\n  os: linux\n  k0s: https://example/k0s\n- arch: arm64\n  nested:\n    deeper: [1, 2]\n"
        )
    }

    fn err(text: &str) -> String {
        parse_index(text).unwrap_err().to_string()
    }

    #[test]
    fn parses_a_channel_index() {
        let i = parse_index(&good()).unwrap();
        assert_eq!(i.version, "1.4.2");
        let names: Vec<_> = i.platforms.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["linux-amd64", "linux-arm64", "linux-arm"]);
        assert_eq!(hex(&i.platforms[0].sha256), A);
        assert_eq!(hex(&i.platforms[1].sha256), B.to_lowercase());
        assert_eq!(i.platforms[1].url, "1.4.2/arm64/update.kiln");
        assert_eq!(i.platforms[2].url, "/kiln/it's/armv7/update.kiln");
        let o = i.for_arch("amd64").unwrap();
        assert_eq!(
            (o.version.as_str(), o.url.as_str()),
            (
                "1.4.2",
                "http://10.0.2.2:8080/kiln/stable/1.4.2/amd64/update.kiln"
            )
        );
        assert_eq!(
            i.for_arch("armv7").unwrap().url,
            "/kiln/it's/armv7/update.kiln"
        );
        // CRLF line ends and a quoted version.
        let crlf = good()
            .replace("version: 1.4.2", "version: \"1.4.2\"")
            .replace('\n', "\r\n");
        assert_eq!(parse_index(&crlf).unwrap(), i);
    }

    #[test]
    fn resolves_relative_urls_against_the_index() {
        let mut i = parse_index(&good()).unwrap();
        let url = index_url("http://10.0.2.2:8080/kiln/", "stable");
        assert_eq!(url, "http://10.0.2.2:8080/kiln/stable/index.yaml");
        i.resolve(&url).unwrap();
        assert_eq!(
            i.for_arch("amd64").unwrap().url,
            "http://10.0.2.2:8080/kiln/stable/1.4.2/amd64/update.kiln"
        );
        assert_eq!(
            i.for_arch("arm64").unwrap().url,
            "http://10.0.2.2:8080/kiln/stable/1.4.2/arm64/update.kiln"
        );
        assert_eq!(
            i.for_arch("armv7").unwrap().url,
            "http://10.0.2.2:8080/kiln/it's/armv7/update.kiln"
        );
    }

    #[test]
    fn a_missing_platform_is_named() {
        let text = format!("version: 2\nplatforms:\n  linux-amd64:\n    url: a\n    sha256: {A}\n");
        let i = parse_index(&text).unwrap();
        let e = i.for_arch("armv7").unwrap_err().to_string();
        assert_eq!(
            e,
            "the channel has no build for linux-arm (armv7); its index.yaml offers linux-amd64"
        );
        assert!(i
            .for_arch("riscv64")
            .unwrap_err()
            .to_string()
            .contains("amd64, arm64 and armv7"));
        assert_eq!(
            platform_of(this_arch()).is_ok(),
            cfg!(any(
                target_arch = "x86_64",
                target_arch = "aarch64",
                target_arch = "arm"
            ))
        );
    }

    #[test]
    fn refuses_what_it_cannot_read_naming_the_line() {
        let p = |body: &str| format!("version: 1.4.2\nplatforms:\n  linux-amd64:\n{body}");
        let cases: Vec<(String, &str)> = vec![
            (p(&format!("    url: a\n    sha256: {}\n", &A[..63])), "line 5: sha256 of `linux-amd64` is not 64 hex digits"),
            (p(&format!("    url: a\n    sha256: {}x\n", &A[..63])), "line 5: sha256 of `linux-amd64` is not 64 hex"),
            (p(&format!("    url: a\n   sha256: {A}\n")), "line 5: indented by 3 spaces, but the keys of `linux-amd64` above are indented by 4"),
            (p(&format!("    url: a\n     sha256: {A}\n")), "line 5: `url` takes one value"),
            (format!("version: 1.4.2\nplatforms:\n  linux-amd64:\n    url: a\n    sha256: {A}\n linux-arm64:\n"), "line 6: indented by 1 spaces, but the platform names above are indented by 2"),
            ("  version: 1\n".into(), "line 1: indented by 2 spaces"),
            (p(&format!("\turl: a\n    sha256: {A}\n")), "line 4: a tab in the indentation"),
            (p("    url: a\n"), "line 3: `linux-amd64` has no `sha256:`"),
            (p(&format!("    sha256: {A}\n")), "line 3: `linux-amd64` has no `url:`"),
            (p(&format!("    url: a\n    url: b\n    sha256: {A}\n")), "line 5: `url` appears twice (first on line 4)"),
            (p(&format!("    url: \"a\n    sha256: {A}\n")), "line 4: a \"quoted value without its closing quote"),
            (p(&format!("    url: \"a\" b\n    sha256: {A}\n")), "line 4: \"b\" after the closing quote"),
            (p(&format!("    url: {{a: b}}\n    sha256: {A}\n")), "line 4: \"{a: b}\": flow collections"),
            (p(&format!("    url: ftp://h/u.kiln\n    sha256: {A}\n")), "line 4: url of `linux-amd64`: \"ftp://h/u.kiln\": the scheme \"ftp\" is not supported"),
            (p(&format!("    url: a b\n    sha256: {A}\n")), "line 4: url of `linux-amd64` contains ' '"),
            ("version: v1.2\nplatforms:\n".into(), "line 1: `v1.2` is not a version"),
            ("version:\n".into(), "line 1: `version` has no value"),
            ("version: 1\nversion: 2\n".into(), "line 2: `version` appears twice (first on line 1)"),
            ("version: 1\nplatforms: linux-amd64\n".into(), "line 2: `platforms` opens a block"),
            ("version: 1\nplatforms:\n".into(), "line 2: `platforms` is empty"),
            ("version: 1\nplatforms:\n- linux-amd64\n".into(), "line 3: `platforms` is a list here"),
            ("version: 1\nplatforms:\n  linux-amd64: x\n".into(), "line 3: `linux-amd64` needs `url:` and `sha256:`"),
            ("- version: 1\n".into(), "line 1: a list item"),
            ("version 1\n".into(), "line 1: \"version 1\" is not a `key: value` line"),
            (format!("version: 1\nplatforms:\n  a:\n    url: x\n    sha256: {A}\n  a:\n    url: x\n    sha256: {A}\n"), "line 6: `a` appears twice (first on line 3)"),
            ("platforms:\n  a:\n    url: x\n".into(), "line 2: `a` has no `sha256:`"),
            (format!("platforms:\n  a:\n    url: x\n    sha256: {A}\n"), "index.yaml: there is no `version:`"),
            ("version: 1\n".into(), "index.yaml: there is no `platforms:`"),
        ];
        for (text, want) in cases {
            let e = err(&text);
            assert!(e.contains(want), "{text}\n-> {e}\n   wanted {want}");
        }
    }

    #[test]
    fn newer_compares_versions() {
        assert!(newer("1.4.10", "1.4.9"));
        assert!(!newer("1.4.2", "1.4.2.0"));
        assert!(!newer("1.4.1", "1.4.2"));
        assert!(!newer("1.5", "garbage"));
        assert!(!newer("garbage", "1.0"));
    }

    proptest::proptest! {
        #[test]
        fn any_text_never_panics(s in "[ -~\t\n]{0,200}") {
            let _ = parse_index(&s);
        }
    }

    // -- loopback server ----------------------------------------------------

    const SIZE: usize = 3 << 20;

    fn body() -> Vec<u8> {
        (0..SIZE).map(|i| (i * 7 + i / 4093) as u8).collect()
    }

    fn sha(b: &[u8]) -> [u8; 32] {
        Sha256::digest(b).into()
    }

    /// Serves the test paths; `/gate` sends half of the body, then waits for
    /// the client to say it has read that half before sending the rest, so
    /// a client that buffered the whole body would never get it.
    fn serve() -> (String, mpsc::Sender<()>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let (tx, rx) = mpsc::channel::<()>();
        let rx = Arc::new(Mutex::new(rx));
        let body = Arc::new(body());
        let index = format!(
            "version: 1.4.2\nplatforms:\n  linux-amd64:\n    url: 1.4.2/amd64/update.kiln\n    sha256: {}\n",
            hex(&sha(&body))
        );
        thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let (body, index, rx) = (body.clone(), index.clone(), rx.clone());
                thread::spawn(move || {
                    let mut head = Vec::new();
                    let mut b = [0u8; 1];
                    while !head.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
                        head.push(b[0]);
                    }
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let len = |n: usize| format!("HTTP/1.1 200 OK\r\nContent-Length: {n}\r\n\r\n");
                    let _ = match path.as_str() {
                        "/kiln/stable/index.yaml" => s.write_all(format!("{}{index}", len(index.len())).as_bytes()),
                        "/len" | "/kiln/stable/1.4.2/amd64/update.kiln" => s
                            .write_all(len(SIZE).as_bytes())
                            .and_then(|_| s.write_all(&body)),
                        "/gate" => s
                            .write_all(len(SIZE).as_bytes())
                            .and_then(|_| s.write_all(&body[..SIZE / 2]))
                            .and_then(|_| {
                                rx.lock().unwrap().recv_timeout(Duration::from_secs(20)).map_err(|_| io::Error::other("no go"))
                            })
                            .and_then(|_| s.write_all(&body[SIZE / 2..])),
                        "/chunked" => {
                            let mut r = s.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                            for (i, c) in body.chunks(70_001).enumerate() {
                                let ext = if i % 2 == 0 { ";x=1" } else { "" };
                                r = r
                                    .and_then(|_| s.write_all(format!("{:X}{ext}\r\n", c.len()).as_bytes()))
                                    .and_then(|_| s.write_all(c))
                                    .and_then(|_| s.write_all(b"\r\n"));
                            }
                            r.and_then(|_| s.write_all(b"0\r\nX-Trailer: y\r\n\r\n"))
                        }
                        "/stall" => s
                            .write_all(len(SIZE).as_bytes())
                            .and_then(|_| s.write_all(&body[..1000]))
                            .map(|_| thread::sleep(Duration::from_secs(3))),
                        "/redirect" => s.write_all(b"HTTP/1.1 302 Found\r\nLocation: redirect2\r\nContent-Length: 0\r\n\r\n"),
                        "/redirect2" => s.write_all(b"HTTP/1.1 301 Moved\r\nLocation: /len\r\n\r\n"),
                        "/loop" => s.write_all(b"HTTP/1.1 307 Again\r\nLocation: /loop\r\n\r\n"),
                        "/short" => s
                            .write_all(len(SIZE).as_bytes())
                            .and_then(|_| s.write_all(&body[..SIZE - 1000])),
                        "/short-chunked" => s
                            .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n100000\r\n")
                            .and_then(|_| s.write_all(&body[..1000])),
                        _ => s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"),
                    };
                });
            }
        });
        (base, tx)
    }

    fn offer(base: &str, path: &str) -> Offer {
        Offer {
            version: "1.4.2".into(),
            url: format!("{base}{path}"),
            sha256: sha(&body()),
        }
    }

    fn opts() -> fetch::Options {
        fetch::Options {
            read_timeout: Duration::from_secs(20),
            ..fetch::Options::default()
        }
    }

    /// Reads in 4 KiB pieces; the digest and length of what came, or the
    /// error and how much came before it.
    fn drain(r: &mut impl Read) -> Result<([u8; 32], usize), (io::Error, usize)> {
        let mut h = Sha256::new();
        let mut n = 0;
        let mut b = [0u8; 4096];
        loop {
            match r.read(&mut b) {
                Ok(0) => return Ok((h.finalize().into(), n)),
                Ok(k) => {
                    assert!(k <= b.len());
                    h.update(&b[..k]);
                    n += k;
                }
                Err(e) => return Err((e, n)),
            }
        }
    }

    #[test]
    fn fetches_the_index_and_streams_its_bundle() {
        let (base, _tx) = serve();
        let i = fetch_index(&format!("{base}/kiln/"), "stable", &opts()).unwrap();
        let o = i.for_arch("amd64").unwrap();
        assert_eq!(o.url, format!("{base}/kiln/stable/1.4.2/amd64/update.kiln"));
        let mut r = open_bundle(&o, &opts()).unwrap();
        assert_eq!(drain(&mut r).unwrap(), (sha(&body()), SIZE));
        assert_eq!(r.bytes_read(), SIZE as u64);
        // Done is done.
        assert_eq!(r.read(&mut [0u8; 8]).unwrap(), 0);
        let e = fetch_index(&base, "beta", &opts()).unwrap_err();
        assert!(
            e.to_string()
                .ends_with("/beta/index.yaml: server answered 404 Not Found"),
            "{e}"
        );
    }

    #[test]
    fn streams_without_holding_the_body() {
        let (base, tx) = serve();
        let mut r = open_bundle(&offer(&base, "/gate"), &opts()).unwrap();
        let mut h = Sha256::new();
        let mut b = vec![0u8; 4096];
        let mut n = 0;
        while n < SIZE / 2 {
            let k = r.read(&mut b[..(SIZE / 2 - n).min(4096)]).unwrap();
            assert!(k > 0);
            h.update(&b[..k]);
            n += k;
        }
        tx.send(()).unwrap();
        let (_, rest) = {
            let mut rest = Vec::new();
            r.read_to_end(&mut rest).unwrap();
            h.update(&rest);
            ((), rest.len())
        };
        assert_eq!(n + rest, SIZE);
        assert_eq!(<[u8; 32]>::from(h.finalize()), sha(&body()));
    }

    #[test]
    fn chunked_and_redirected_bodies() {
        let (base, _tx) = serve();
        for path in ["/chunked", "/redirect", "/len"] {
            let mut r = open_bundle(&offer(&base, path), &opts()).unwrap();
            assert_eq!(drain(&mut r).unwrap(), (sha(&body()), SIZE), "{path}");
        }
        let e = open_bundle(&offer(&base, "/loop"), &opts()).unwrap_err();
        assert_eq!(e.to_string(), format!("{base}/loop: more than 5 redirects"));
        let e = open_bundle(&offer(&base, "/nothing"), &opts())
            .err()
            .unwrap();
        assert_eq!(
            e.to_string(),
            format!("{base}/nothing: server answered 404 Not Found")
        );
    }

    #[test]
    fn a_wrong_digest_fails_at_the_end() {
        let (base, _tx) = serve();
        let mut o = offer(&base, "/len");
        o.sha256 = [0xab; 32];
        let mut r = open_bundle(&o, &opts()).unwrap();
        let (e, n) = drain(&mut r).unwrap_err();
        assert_eq!(n, SIZE);
        assert_eq!(e.kind(), ErrorKind::InvalidData);
        assert_eq!(
            e.to_string(),
            format!(
                "the bundle from {base}/len has sha256 {}, but the channel's index.yaml says {}",
                hex(&sha(&body())),
                "ab".repeat(32)
            )
        );
        // It stays failed.
        assert_eq!(
            r.read(&mut [0u8; 8]).unwrap_err().kind(),
            ErrorKind::InvalidData
        );
        // The same for a chunked body.
        o.url = format!("{base}/chunked");
        let (e, _) = drain(&mut open_bundle(&o, &opts()).unwrap()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidData);
    }

    #[test]
    fn a_stalled_server_times_out() {
        let (base, _tx) = serve();
        let o = fetch::Options {
            read_timeout: Duration::from_millis(300),
            ..fetch::Options::default()
        };
        let mut r = open_bundle(&offer(&base, "/stall"), &o).unwrap();
        let t = Instant::now();
        let (e, n) = drain(&mut r).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(2));
        assert_eq!((e.kind(), n), (ErrorKind::TimedOut, 1000));
        assert_eq!(
            e.to_string(),
            format!("the bundle from {base}/stall: no data for 0.3 s after 1000 bytes")
        );
    }

    #[test]
    fn a_truncated_body_fails() {
        let (base, _tx) = serve();
        let mut r = open_bundle(&offer(&base, "/short"), &opts()).unwrap();
        let (e, n) = drain(&mut r).unwrap_err();
        assert_eq!((e.kind(), n), (ErrorKind::UnexpectedEof, SIZE - 1000));
        assert_eq!(
            e.to_string(),
            format!("the bundle from {base}/short is truncated: got {} of the {SIZE} bytes announced (1000 missing); the server or the network dropped the connection", SIZE - 1000)
        );
        let mut r = open_bundle(&offer(&base, "/short-chunked"), &opts()).unwrap();
        let (e, n) = drain(&mut r).unwrap_err();
        assert_eq!((e.kind(), n), (ErrorKind::UnexpectedEof, 1000));
        assert!(
            e.to_string()
                .contains("is truncated: the connection closed inside a chunk after 1000 bytes"),
            "{e}"
        );
    }
}
