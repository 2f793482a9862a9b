//! A small HTTP/1.1 client for `kiln.config=URL` and update channels: GET
//! over TCP or TLS (`https://`, see [`super::tls`]), `Connection: close`,
//! Content-Length or chunked bodies, a size cap, timeouts, and a few
//! redirects (never from https:// down to http://). TLS keeps a config's
//! secrets from the network and proves the server; a signature
//! (`/etc/kiln/config.pub`) proves who wrote the config.
//!
//! Host names are resolved by the C library (musl reads the /etc/resolv.conf
//! kiln-init writes after DHCP). The response parser is a pure function over
//! the bytes received, so it is tested without a network.

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The largest body accepted: a node config is a small TOML file.
pub const MAX_BODY: usize = 1 << 20;
/// The largest status line plus headers accepted.
pub(crate) const MAX_HEAD: usize = 64 << 10;
pub(crate) const MAX_REDIRECTS: usize = 5;

#[derive(Debug, Clone)]
pub struct Options {
    /// Per address tried.
    pub connect_timeout: Duration,
    /// Per read: a server that stops sending for this long is given up on.
    pub read_timeout: Duration,
    /// The whole request, redirects included, so a server dripping bytes
    /// cannot hold the node forever.
    pub total_timeout: Duration,
    pub max_body: usize,
    /// For https:// URLs; None uses the image's trust anchors
    /// ([`super::tls::image_config`]).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            connect_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(10),
            total_timeout: Duration::from_secs(30),
            max_body: MAX_BODY,
            tls: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// https:// cannot be used: the image trusts no CA.
    #[error("{0}")]
    NoTrust(String),
    /// The TLS session failed: the certificate or the handshake.
    #[error("TLS with {host}: {what}")]
    Tls { host: String, what: String, hint: &'static str },
    #[error("{0} redirects from https:// to http://; refused, since that would send the request in the clear")]
    Downgrade(String),
    #[error("{0}")]
    BadUrl(String),
    #[error("cannot resolve host name {host}: {reason}")]
    Resolve { host: String, reason: String },
    #[error("cannot connect to {addr}: {reason}")]
    Connect { addr: String, reason: String },
    #[error("{0}")]
    Io(String),
    #[error("no complete answer within {0} s")]
    Timeout(u64),
    #[error("server answered {code} {reason}")]
    Status { code: u16, reason: String },
    #[error("the answer is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the answer ended early: {0}")]
    Truncated(String),
    #[error("malformed HTTP answer: {0}")]
    Malformed(String),
    #[error("more than {MAX_REDIRECTS} redirects")]
    TooManyRedirects,
}

impl FetchError {
    /// What to do about it, for the console.
    pub fn hint(&self) -> &'static str {
        match self {
            FetchError::NoTrust(_) => "add the server's CA to node.trust in the profile and rebuild",
            FetchError::Tls { hint, .. } => hint,
            FetchError::Downgrade(_) => "make the server redirect to an https:// URL, or name the final URL",
            FetchError::BadUrl(_) => "fix kiln.config= on the kernel command line (in boot.ipxe or the boot entry)",
            FetchError::Resolve { .. } => "check the host name and the DNS server the DHCP lease gave, or use an IP address",
            FetchError::Connect { .. } => "check that the server is running and reachable from this node (address, port, firewall)",
            FetchError::Timeout(_) => "the server or the network is too slow or drops packets; check both",
            FetchError::Status { code: 404, .. } => "put this node's config there (kiln serve --configs DIR serves DIR/<mac>.toml)",
            FetchError::Status { code: 401 | 403, .. } => "the server refuses to hand it out; check its permissions",
            FetchError::Status { code, .. } if *code >= 500 => "the server failed; check its log",
            FetchError::Status { .. } => "check the URL and the server",
            FetchError::TooLarge(_) => "a node config is a small TOML file; check the URL",
            FetchError::Io(_) | FetchError::Truncated(_) | FetchError::Malformed(_) | FetchError::TooManyRedirects => "check the server and its log",
        }
    }
}

/// An `http://` or `https://` URL, split for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub https: bool,
    /// Without brackets for IPv6 literals.
    pub host: String,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub path: String,
}

impl Url {
    pub fn parse(s: &str) -> Result<Url, FetchError> {
        let s = s.trim();
        let Some((scheme, rest)) = s.split_once("://") else {
            return Err(FetchError::BadUrl(format!("{s:?} is not an http:// or https:// URL")));
        };
        let https = scheme.eq_ignore_ascii_case("https");
        if !https && !scheme.eq_ignore_ascii_case("http") {
            return Err(FetchError::BadUrl(format!(
                "{s:?}: the scheme {scheme:?} is not supported; use https:// (or http://)"
            )));
        }
        if let Some(c) = s.chars().find(|c| c.is_control() || c.is_whitespace()) {
            return Err(FetchError::BadUrl(format!(
                "{s:?} contains {c:?}; percent-encode it"
            )));
        }
        let rest = rest.split('#').next().unwrap_or_default();
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let path = if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        };
        if authority.contains('@') {
            return Err(FetchError::BadUrl(format!(
                "{s:?}: user names and passwords in the URL are not supported"
            )));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let Some((h, after)) = v6.split_once(']') else {
                return Err(FetchError::BadUrl(format!("{s:?}: unclosed [ in the host")));
            };
            let port = match after {
                "" => None,
                p => Some(p.strip_prefix(':').ok_or_else(|| {
                    FetchError::BadUrl(format!("{s:?}: {p:?} after the IPv6 address; only :PORT may follow the ]"))
                })?),
            };
            if h.is_empty() {
                return Err(FetchError::BadUrl(format!("{s:?} has no host")));
            }
            if h.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(FetchError::BadUrl(format!(
                    "{s:?}: [{h}] is not an IPv6 address; only IPv6 addresses go in brackets, as http://[fd00::1]:8080/"
                )));
            }
            (h, port)
        } else {
            let (h, port) = match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            };
            if h.is_empty() {
                return Err(FetchError::BadUrl(format!("{s:?} has no host")));
            }
            if let Some(c) = h.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))) {
                let why = match c {
                    ':' | '[' | ']' => "an IPv6 address goes in brackets, as http://[fd00::1]:8080/",
                    _ => "a host is a name (letters, digits, - and .) or an IPv4 address",
                };
                return Err(FetchError::BadUrl(format!("{s:?}: the host {h:?} contains {c:?}; {why}")));
            }
            (h, port)
        };
        let port =
            match port {
                None | Some("") => if https { 443 } else { 80 },
                Some(p) => p.parse::<u16>().ok().filter(|n| *n != 0 && p.bytes().all(|b| b.is_ascii_digit())).ok_or_else(|| {
                    FetchError::BadUrl(format!("{s:?}: {p:?} is not a port number (1 to 65535)"))
                })?,
            };
        Ok(Url {
            https,
            host: host.to_string(),
            port,
            path,
        })
    }

    /// "https" or "http".
    pub fn scheme(&self) -> &'static str {
        if self.https {
            "https"
        } else {
            "http"
        }
    }

    /// The Host header: the host, bracketed if IPv6, and the port unless
    /// the scheme's default.
    pub fn authority(&self) -> String {
        let h = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        if self.port == if self.https { 443 } else { 80 } {
            h
        } else {
            format!("{h}:{}", self.port)
        }
    }

    /// A redirect's Location, absolute or relative to this URL.
    /// Never from https:// to http://.
    pub(crate) fn join(&self, location: &str) -> Result<Url, FetchError> {
        let next = self.join_any(location)?;
        if self.https && !next.https {
            return Err(FetchError::Downgrade(self.to_string()));
        }
        Ok(next)
    }

    /// Any scheme (a channel's index naming an http:// mirror).
    pub(crate) fn join_any(&self, location: &str) -> Result<Url, FetchError> {
        if location.contains("://") {
            return Url::parse(location);
        }
        if let Some(rest) = location.strip_prefix("//") {
            return Url::parse(&format!("{}://{rest}", self.scheme()));
        }
        let path = if location.starts_with('/') {
            location.to_string()
        } else {
            let base = self.path.split('?').next().unwrap_or("/");
            let dir = &base[..base.rfind('/').map_or(0, |i| i + 1)];
            format!("{dir}{location}")
        };
        Url::parse(&format!("{}://{}{path}", self.scheme(), self.authority()))
    }
}

impl fmt::Display for Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}{}", self.scheme(), self.authority(), self.path)
    }
}

/// A parsed answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub code: u16,
    pub reason: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Where parsing the bytes received so far got to.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    Done(Response),
    /// More bytes are needed; at end of stream this is the reason it is
    /// truncated.
    Need(String),
}

/// GETs `url` and returns the body of a 2xx answer. Any other status is
/// [`FetchError::Status`]. Redirects are followed (not from https:// to
/// http://).
pub fn get(url: &str, opts: &Options) -> Result<Vec<u8>, FetchError> {
    let deadline = Instant::now() + opts.total_timeout;
    let mut url = Url::parse(url)?;
    for _ in 0..=MAX_REDIRECTS {
        let r = request(&url, opts, deadline)?;
        match r.code {
            200..=299 => return Ok(r.body),
            301 | 302 | 303 | 307 | 308 => {
                let loc = r.header("location").ok_or_else(|| {
                    FetchError::Malformed(format!("{} redirect without a Location", r.code))
                })?;
                url = url.join(loc)?;
            }
            code => {
                return Err(FetchError::Status {
                    code,
                    reason: r.reason,
                })
            }
        }
    }
    Err(FetchError::TooManyRedirects)
}

/// How long to wait for one step: `d`, but not past the deadline.
fn left(deadline: Instant, d: Duration) -> Duration {
    deadline.saturating_duration_since(Instant::now()).min(d).max(Duration::from_millis(1))
}

/// A connection to a server: plain TCP, or TLS over it.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<super::tls::Stream>),
}

impl Conn {
    pub fn set_read_timeout(&self, d: Option<Duration>) -> std::io::Result<()> {
        self.tcp().set_read_timeout(d)
    }

    fn tcp(&self) -> &TcpStream {
        match self {
            Conn::Plain(s) => s,
            Conn::Tls(t) => &t.sock,
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(t) => t.flush(),
        }
    }
}

/// Connects (with TLS for https://) and sends the GET for `url`; the answer
/// then comes on the connection.
pub(crate) fn send_request(url: &Url, opts: &Options, deadline: Instant) -> Result<Conn, FetchError> {
    let total = opts.total_timeout.as_secs();
    // What to trust, before any traffic.
    let cfg = match (&opts.tls, url.https) {
        (_, false) => None,
        (Some(c), true) => Some(c.clone()),
        (None, true) => Some(super::tls::image_config().map_err(FetchError::NoTrust)?),
    };
    let tcp = connect(url, opts, deadline)?;
    let _ = tcp.set_write_timeout(Some(left(deadline, opts.read_timeout)));
    let mut conn = if let Some(cfg) = cfg {
        let _ = tcp.set_read_timeout(Some(left(deadline, opts.read_timeout)));
        let s = super::tls::handshake(cfg, &url.host, tcp).map_err(|e| tls_error(url, &e, total))?;
        Conn::Tls(Box::new(s))
    } else {
        Conn::Plain(tcp)
    };
    conn.write_all(request_text(url).as_bytes())
        .and_then(|()| conn.flush())
        .map_err(|e| tls_error(url, &e, total))?;
    Ok(conn)
}

/// An I/O error from a connection: a TLS failure said as such, else as
/// [`io_error`] says it.
fn tls_error(url: &Url, e: &std::io::Error, total: u64) -> FetchError {
    match super::tls::rustls_error(e) {
        Some(r) => {
            let p = super::tls::describe(r, super::tls::Clock::now());
            FetchError::Tls { host: url.authority(), what: p.what, hint: p.hint }
        }
        None => io_error(if url.https { "the TLS handshake or request" } else { "sending the request" }, e, total),
    }
}

/// One read of the answer (0 at its end), within the request's deadline.
pub(crate) fn read_answer(stream: &mut Conn, chunk: &mut [u8], opts: &Options, deadline: Instant) -> Result<usize, FetchError> {
    let total = opts.total_timeout.as_secs();
    loop {
        if Instant::now() >= deadline {
            return Err(FetchError::Timeout(total));
        }
        let _ = stream.tcp().set_read_timeout(Some(left(deadline, opts.read_timeout)));
        match stream.read(chunk) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // A TLS server that closes without close_notify: anyone on the
            // path could have cut the answer there.
            Err(e) if e.kind() == ErrorKind::UnexpectedEof && matches!(stream, Conn::Tls(_)) => {
                return Err(FetchError::Truncated("the server closed the TLS connection without close_notify".into()))
            }
            Err(e) => return Err(io_error("reading the answer", &e, total)),
        }
    }
}

fn request(url: &Url, opts: &Options, deadline: Instant) -> Result<Response, FetchError> {
    let mut stream = send_request(url, opts, deadline)?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 << 10];
    // Chunk framing can add a little to the body; tiny chunks beyond that are
    // refused as oversize.
    let raw_cap = MAX_HEAD + opts.max_body + opts.max_body / 2 + 1024;
    loop {
        let n = read_answer(&mut stream, &mut chunk, opts, deadline)?;
        buf.extend_from_slice(&chunk[..n]);
        let eof = n == 0;
        match parse_response(&buf, opts.max_body, eof)? {
            Parsed::Done(r) => return Ok(r),
            Parsed::Need(why) if eof => return Err(FetchError::Truncated(why)),
            Parsed::Need(_) if buf.len() > raw_cap => {
                return Err(FetchError::TooLarge(opts.max_body))
            }
            Parsed::Need(_) => {}
        }
    }
}

pub(crate) fn connect(
    url: &Url,
    opts: &Options,
    deadline: Instant,
) -> Result<TcpStream, FetchError> {
    let addrs: Vec<SocketAddr> = (url.host.as_str(), url.port)
        .to_socket_addrs()
        .map_err(|e| FetchError::Resolve {
            host: url.host.clone(),
            reason: e.to_string(),
        })?
        .collect();
    if addrs.is_empty() {
        return Err(FetchError::Resolve {
            host: url.host.clone(),
            reason: "no addresses".into(),
        });
    }
    let mut last = None;
    for a in &addrs {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(FetchError::Timeout(opts.total_timeout.as_secs()));
        }
        match TcpStream::connect_timeout(a, opts.connect_timeout.min(left)) {
            Ok(s) => return Ok(s),
            Err(e) => {
                let reason = if matches!(e.kind(), ErrorKind::TimedOut | ErrorKind::WouldBlock) {
                    format!(
                        "no answer within {} s",
                        opts.connect_timeout.min(left).as_secs_f32()
                    )
                } else {
                    e.to_string()
                };
                last = Some(FetchError::Connect {
                    addr: a.to_string(),
                    reason,
                });
            }
        }
    }
    Err(last.unwrap_or(FetchError::Connect {
        addr: url.authority(),
        reason: "no address to try".into(),
    }))
}

pub(crate) fn io_error(doing: &str, e: &std::io::Error, total: u64) -> FetchError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => FetchError::Timeout(total),
        _ => FetchError::Io(format!("{doing}: {e}")),
    }
}

/// Parses an HTTP/1.x answer from the bytes received so far. `eof` says the
/// server closed the connection, which ends a body without a length.
/// Arbitrary bytes give an error or `Need`, never a panic.
pub fn parse_response(buf: &[u8], max_body: usize, eof: bool) -> Result<Parsed, FetchError> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let Some((head_len, body_at)) = head_end(rest) else {
            if rest.len() > MAX_HEAD {
                return Err(FetchError::Malformed(format!(
                    "headers longer than {} KiB",
                    MAX_HEAD >> 10
                )));
            }
            return Ok(Parsed::Need(if rest.is_empty() {
                "no answer at all (connection closed)".into()
            } else {
                "the headers are incomplete".into()
            }));
        };
        if head_len > MAX_HEAD {
            return Err(FetchError::Malformed(format!(
                "headers longer than {} KiB",
                MAX_HEAD >> 10
            )));
        }
        let (code, reason, headers) = parse_head(&rest[..head_len])?;
        // Interim answers (100 Continue) come before the real one.
        if (100..200).contains(&code) && code != 101 {
            at += body_at;
            continue;
        }
        let body = &rest[body_at..];
        let resp = |body: Vec<u8>| Response {
            code,
            reason: reason.clone(),
            headers: headers.clone(),
            body,
        };
        match body_length(code, &headers)? {
            BodyLength::Chunked => {
                return Ok(match dechunk(body, max_body)? {
                    Some(b) => Parsed::Done(resp(b)),
                    None => Parsed::Need("the chunked body has no last chunk".into()),
                });
            }
            BodyLength::Bytes(len) => {
                if len > max_body as u64 {
                    return Err(FetchError::TooLarge(max_body));
                }
                let len = len as usize;
                if body.len() >= len {
                    return Ok(Parsed::Done(resp(body[..len].to_vec())));
                }
                return Ok(Parsed::Need(format!("got {} of the {len} bytes announced", body.len())));
            }
            BodyLength::UntilClose => {}
        }
        if body.len() > max_body {
            return Err(FetchError::TooLarge(max_body));
        }
        return Ok(if eof {
            Parsed::Done(resp(body.to_vec()))
        } else {
            Parsed::Need("the body is incomplete".into())
        });
    }
}

/// The length of the head (status line and headers, without the blank
/// line) and where the body starts. Bare LF line ends are tolerated.
pub(crate) fn head_end(buf: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < buf.len() {
        if buf[i] == b'\n' {
            if buf.get(i + 1) == Some(&b'\n') {
                return Some((i, i + 2));
            }
            if buf.get(i + 1) == Some(&b'\r') && buf.get(i + 2) == Some(&b'\n') {
                return Some((i, i + 3));
            }
        }
        i += 1;
    }
    None
}

pub(crate) type Head = (u16, String, Vec<(String, String)>);

pub(crate) fn parse_head(head: &[u8]) -> Result<Head, FetchError> {
    let text = String::from_utf8_lossy(head);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let status = lines.next().unwrap_or_default();
    let mut parts = status.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        let shown: String = status.chars().take(60).collect();
        return Err(FetchError::Malformed(format!(
            "not an HTTP/1.x status line: {shown:?}"
        )));
    }
    let code = parts.next().unwrap_or_default();
    let code: u16 = match code.parse() {
        Ok(c) if code.len() == 3 && (100..600).contains(&c) => c,
        _ => return Err(FetchError::Malformed(format!("status code {code:?}"))),
    };
    let reason = parts.next().unwrap_or_default().trim().to_string();
    let mut headers = Vec::new();
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            let shown: String = l.chars().take(60).collect();
            return Err(FetchError::Malformed(format!(
                "header line without a colon: {shown:?}"
            )));
        };
        if k.is_empty() || k.contains(char::is_whitespace) {
            return Err(FetchError::Malformed(format!("bad header name {k:?}")));
        }
        headers.push((k.to_string(), v.trim().to_string()));
    }
    Ok((code, reason, headers))
}

/// Decodes a chunked body; None while the last chunk has not arrived.
fn dechunk(mut buf: &[u8], max_body: usize) -> Result<Option<Vec<u8>>, FetchError> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
            if buf.len() > 1024 {
                return Err(FetchError::Malformed("chunk size line too long".into()));
            }
            return Ok(None);
        };
        let line = String::from_utf8_lossy(&buf[..nl]);
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| {
            FetchError::Malformed(format!("chunk size {size_text:?} is not hexadecimal"))
        })?;
        buf = &buf[nl + 1..];
        if size == 0 {
            // Trailers, up to the blank line.
            loop {
                let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
                    return Ok(None);
                };
                let line = &buf[..nl];
                buf = &buf[nl + 1..];
                if line.is_empty() || line == b"\r" {
                    return Ok(Some(out));
                }
            }
        }
        if size > max_body || out.len() + size > max_body {
            return Err(FetchError::TooLarge(max_body));
        }
        if buf.len() < size {
            return Ok(None);
        }
        out.extend_from_slice(&buf[..size]);
        buf = &buf[size..];
        // The CRLF after the data.
        if buf.starts_with(b"\r\n") {
            buf = &buf[2..];
        } else if buf.starts_with(b"\n") {
            buf = &buf[1..];
        } else if buf.is_empty() || buf == b"\r" {
            return Ok(None);
        } else {
            return Err(FetchError::Malformed(
                "chunk data longer than its size".into(),
            ));
        }
    }
}

/// The request [`get`] sends, for clients that read the answer themselves
/// (`update::channel` streams update bundles).
pub(crate) fn request_text(url: &Url) -> String {
    format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: kiln-init/{}\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        url.path,
        url.authority(),
        env!("CARGO_PKG_VERSION")
    )
}

/// How the end of a 2xx answer's body is known, from its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLength {
    Chunked,
    Bytes(u64),
    /// The server closes the connection.
    UntilClose,
}

/// The framing of a body by the rules [`parse_response`] applies (for
/// clients that read the body themselves: `update::channel`).
pub(crate) fn body_length(
    code: u16,
    headers: &[(String, String)],
) -> Result<BodyLength, FetchError> {
    let get = |name: &str| {
        headers
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
            .collect::<Vec<_>>()
    };
    if code == 204 || code == 304 {
        return Ok(BodyLength::Bytes(0));
    }
    let te = get("transfer-encoding");
    if !te.is_empty() {
        let last = te
            .iter()
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .rfind(|t| !t.is_empty())
            .unwrap_or("");
        if !last.eq_ignore_ascii_case("chunked") {
            return Err(FetchError::Malformed(format!(
                "unsupported Transfer-Encoding {last:?}"
            )));
        }
        return Ok(BodyLength::Chunked);
    }
    let mut len = None;
    for v in get("content-length").iter().flat_map(|v| v.split(',')) {
        let n: u64 = v
            .trim()
            .parse()
            .map_err(|_| FetchError::Malformed(format!("Content-Length {v:?} is not a number")))?;
        if len.is_some_and(|l| l != n) {
            return Err(FetchError::Malformed(
                "conflicting Content-Length headers".into(),
            ));
        }
        len = Some(n);
    }
    Ok(len.map_or(BodyLength::UntilClose, BodyLength::Bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn done(b: &[u8]) -> Response {
        match parse_response(b, MAX_BODY, true) {
            Ok(Parsed::Done(r)) => r,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn urls() {
        let u = Url::parse("http://10.0.2.2:8080/configs/52:54:00:12:34:56.toml").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("10.0.2.2", 8080, "/configs/52:54:00:12:34:56.toml")
        );
        assert_eq!(u.authority(), "10.0.2.2:8080");
        assert_eq!(
            u.to_string(),
            "http://10.0.2.2:8080/configs/52:54:00:12:34:56.toml"
        );
        let u = Url::parse("HTTP://boot.example").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.path.as_str(),
                u.authority().as_str()
            ),
            ("boot.example", 80, "/", "boot.example")
        );
        let u = Url::parse("http://[fd00::1]:81/a?mac=x#frag").unwrap();
        assert_eq!(
            (
                u.host.as_str(),
                u.port,
                u.path.as_str(),
                u.authority().as_str()
            ),
            ("fd00::1", 81, "/a?mac=x", "[fd00::1]:81")
        );
        assert_eq!(Url::parse("http://h?x=1").unwrap().path, "/?x=1");
        let u = Url::parse("https://h/x").unwrap();
        assert_eq!((u.https, u.port, u.authority().as_str(), u.to_string().as_str()), (true, 443, "h", "https://h/x"));
        assert_eq!(Url::parse("https://h:8443/x").unwrap().to_string(), "https://h:8443/x");
        for bad in [
            "ftp://h/x",
            "h/x",
            "http:///x",
            "http://h:99999/",
            "http://h:0/",
            "http://u:p@h/",
            "http://h/a b",
            "http://[::1/",
        ] {
            assert!(
                matches!(Url::parse(bad), Err(FetchError::BadUrl(_))),
                "{bad}"
            );
        }
        let base = Url::parse("http://h:8/a/b.toml?q").unwrap();
        assert_eq!(
            base.join("c.toml").unwrap().to_string(),
            "http://h:8/a/c.toml"
        );
        assert_eq!(base.join("/x").unwrap().to_string(), "http://h:8/x");
        assert_eq!(base.join("http://o/y").unwrap().to_string(), "http://o/y");
        assert_eq!(base.join("//o:9/y").unwrap().to_string(), "http://o:9/y");
        assert_eq!(base.join("https://o/y").unwrap().to_string(), "https://o/y");
        let secure = Url::parse("https://h/a/b.toml").unwrap();
        assert_eq!(secure.join("//o/y").unwrap().to_string(), "https://o/y");
        assert_eq!(secure.join("c").unwrap().to_string(), "https://h/a/c");
        assert!(matches!(secure.join("http://h/a/c"), Err(FetchError::Downgrade(_))));
    }

    #[test]
    fn hosts_are_names_ipv4_or_bracketed_ipv6() {
        for (good, host, port) in [
            ("http://[::1]:8080/x", "::1", 8080),
            ("http://10.0.2.2/x", "10.0.2.2", 80),
            ("https://host.example:443/", "host.example", 443),
            ("https://[fd00::1]/", "fd00::1", 443),
            ("http://under_score-1.lab:/", "under_score-1.lab", 80),
        ] {
            let u = Url::parse(good).unwrap_or_else(|e| panic!("{good}: {e}"));
            assert_eq!((u.host.as_str(), u.port), (host, port), "{good}");
            // What it prints parses back to the same URL.
            assert_eq!(Url::parse(&u.to_string()).as_ref(), Ok(&u), "{good}");
        }
        for (bad, says) in [
            ("http://a]:b:80/x", "the host \"a]:b\" contains ']'"),
            ("http://a]/x", "contains ']'"),
            ("http://a[b/x", "contains '['"),
            ("http://fd00::1/x", "an IPv6 address goes in brackets"),
            ("http://[::1/x", "unclosed ["),
            ("http://[::1]x/", "\"x\" after the IPv6 address"),
            ("http://[::1]]:80/", "after the IPv6 address"),
            ("http://[10.0.2.2]/", "is not an IPv6 address"),
            ("http://[a]:b:80/x", "is not an IPv6 address"),
            ("http://[]/x", "has no host"),
            ("http:///x", "has no host"),
            ("http://:80/x", "has no host"),
            ("https://", "has no host"),
            ("http://h:65536/", "is not a port number"),
            ("http://h:99999/", "is not a port number"),
            ("http://[::1]:70000/", "is not a port number"),
            ("http://h:+80/", "is not a port number"),
            ("http://h:8o/", "is not a port number"),
            ("http://h%41/", "contains '%'"),
            ("http://b\u{fc}cher.example/", "contains '\u{fc}'"),
        ] {
            match Url::parse(bad) {
                Err(e @ FetchError::BadUrl(_)) => assert!(e.to_string().contains(says), "{bad}: {e}"),
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn status_line_and_headers() {
        let r = done(b"HTTP/1.1 404 Not Found\r\nContent-Length: 3\r\nX-A:  b \r\n\r\nno!");
        assert_eq!(
            (r.code, r.reason.as_str(), r.body.as_slice()),
            (404, "Not Found", &b"no!"[..])
        );
        assert_eq!(r.header("x-a"), Some("b"));
        // Bare LF, no reason phrase, HTTP/1.0 without a length (ends at EOF).
        let r = done(b"HTTP/1.0 200\nServer: x\n\nrole = 1\n");
        assert_eq!(
            (r.code, r.reason.as_str(), r.body.as_slice()),
            (200, "", &b"role = 1\n"[..])
        );
        // 100 Continue first.
        let r =
            done(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert_eq!((r.code, r.body.as_slice()), (200, &b"ok"[..]));
        // Extra bytes after Content-Length are ignored.
        assert_eq!(
            done(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokEXTRA").body,
            b"ok"
        );
        for bad in [
            &b"SSH-2.0-OpenSSH\r\n\r\n"[..],
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 abc OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/2 200\r\n\r\n",
        ] {
            assert!(
                matches!(
                    parse_response(bad, MAX_BODY, true),
                    Err(FetchError::Malformed(_))
                ),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn chunked() {
        let r = done(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=1\r\nrole \r\nB\r\n= \"single\"\n\r\n0\r\nTrailer: x\r\n\r\n");
        assert_eq!(r.body, b"role = \"single\"\n");
        // Chunked wins over Content-Length.
        let r = done(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n");
        assert_eq!(r.body, b"ok");
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                MAX_BODY,
                true
            ),
            Err(FetchError::Malformed(_))
        ));
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                MAX_BODY,
                true
            ),
            Err(FetchError::Malformed(_))
        ));
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nabc\r\n",
                MAX_BODY,
                true
            ),
            Err(FetchError::Malformed(_))
        ));
    }

    #[test]
    fn truncated_answers_need_more() {
        let cases: [(&[u8], &str); 5] = [
            (b"", "no answer"),
            (b"HTTP/1.1 200 OK\r\nContent-Le", "headers are incomplete"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                "got 3 of the 10 bytes",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
                "no last chunk",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n",
                "no last chunk",
            ),
        ];
        for (b, why) in cases {
            match parse_response(b, MAX_BODY, true) {
                Ok(Parsed::Need(w)) => assert!(w.contains(why), "{w}"),
                other => panic!("{other:?}"),
            }
        }
        // Without a length the body is complete only at EOF.
        assert!(matches!(
            parse_response(b"HTTP/1.1 200 OK\r\n\r\nab", MAX_BODY, false),
            Ok(Parsed::Need(_))
        ));
    }

    #[test]
    fn oversize_is_refused_early() {
        let over = format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
            MAX_BODY + 1
        );
        assert_eq!(
            parse_response(over.as_bytes(), MAX_BODY, false),
            Err(FetchError::TooLarge(MAX_BODY))
        );
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\n\r\n12345", 4, false),
            Err(FetchError::TooLarge(4))
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n3\r\n",
                4,
                false
            ),
            Err(FetchError::TooLarge(4))
        );
        assert_eq!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\n",
                4,
                false
            ),
            Err(FetchError::TooLarge(4))
        );
        assert!(matches!(
            parse_response(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1FFFFFFFFFFFFFFFFF\r\n",
                4,
                false
            ),
            Err(FetchError::Malformed(_))
        ));
        let long = vec![b'a'; MAX_HEAD + 10];
        assert!(matches!(
            parse_response(&long, MAX_BODY, false),
            Err(FetchError::Malformed(_))
        ));
    }

    #[test]
    fn hints_say_what_to_do() {
        let e = FetchError::Status {
            code: 404,
            reason: "Not Found".into(),
        };
        assert_eq!(format!("{e}; {}", e.hint()), "server answered 404 Not Found; put this node's config there (kiln serve --configs DIR serves DIR/<mac>.toml)");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..600), eof: bool, max in 0usize..64) {
            let _ = parse_response(&b, max, eof);
        }

        #[test]
        fn near_valid_answers_never_panic(head in "HTTP/1\\.[01] [0-9]{3}[ -~]{0,10}", hdrs in proptest::collection::vec("(Content-Length|Transfer-Encoding|X): ?[ -~]{0,12}", 0..4), body in "[0-9a-fA-F;\r\n ]{0,80}", eof: bool) {
            let s = format!("{head}\r\n{}\r\n\r\n{body}", hdrs.join("\r\n"));
            let _ = parse_response(s.as_bytes(), 16, eof);
        }

        #[test]
        fn any_url_never_panics(s in "\\PC{0,60}", loc in "\\PC{0,30}") {
            if let Ok(u) = Url::parse(&format!("http://{s}")) {
                let _ = u.join(&loc);
                let _ = u.to_string();
            }
            let _ = Url::parse(&s);
        }

        #[test]
        fn split_anywhere_gives_the_same_answer(cut in 0usize..120) {
            let full: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nrole\r\nB\r\n = \"single\"\r\n0\r\n\r\n";
            let cut = cut.min(full.len());
            let r = parse_response(&full[..cut], MAX_BODY, false).unwrap();
            if cut < full.len() {
                prop_assert!(matches!(r, Parsed::Need(_)));
            } else {
                prop_assert!(matches!(r, Parsed::Done(ref x) if x.body == b"role = \"single\""));
            }
        }
    }
}
