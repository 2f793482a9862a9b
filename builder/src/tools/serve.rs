//! `kiln serve`: a small HTTP/1.1 server for PXE, in the manner of matchbox.
//!
//! It serves the files of a PXE bundle (boot.ipxe, vmlinuz,
//! initramfs.cpio.zst) and per-node configs: `GET /configs/<mac>.toml` (and
//! `.toml.minisig`) answers with `<configs>/<mac>.toml`, the MAC given with
//! colons or hyphens in any case. `boot.ipxe` is served with its
//! `set kiln-server …` line pointing at this server, as the client reached
//! it. Every request is logged as one line, with the node's MAC when known.
//!
//! With TLS (`--tls-cert`/`--tls-key`, or `--init-tls DIR` for a lab CA)
//! one port speaks both: a connection opening with a TLS ClientHello gets
//! TLS, any other plain HTTP, for firmware that cannot do HTTPS (iPXE
//! fetching the kernel and initramfs). A node config holding secrets (a join
//! token, a CA key) is served only over TLS; over plain HTTP it gets 403
//! unless the server was started with `--insecure-http-secrets`. boot.ipxe's
//! `set kiln-config-server` line then names the https:// address.
//!
//! Plain std: a thread per connection, one request per connection.

use std::io::{BufWriter, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The largest request head accepted.
const MAX_HEAD: usize = 16 << 10;
/// Connections served at once; more get 503.
const MAX_CONNECTIONS: usize = 256;
const TIMEOUT: Duration = Duration::from_secs(30);
/// The line of boot.ipxe that is rewritten to name this server.
pub const SERVER_LINE: &str = "set kiln-server ";
/// The line naming where the node fetches its config: the https://
/// address when this server has TLS.
pub const CONFIG_SERVER_LINE: &str = "set kiln-config-server ";
/// A TLS record starts with this byte (handshake).
const TLS_HANDSHAKE: u8 = 0x16;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{path}: {reason}")]
    Dir { path: PathBuf, reason: String },
    #[error("{0}")]
    Tls(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
}

/// A bound server, not yet accepting.
pub struct Server {
    listener: TcpListener,
    site: Arc<Site>,
    opts: Arc<Options>,
}

/// How the server treats TLS and secrets.
#[derive(Default, Clone)]
pub struct Options {
    /// Set: TLS is served on the same port (sniffed per connection).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Serve configs holding secrets over plain HTTP too.
    pub insecure_http_secrets: bool,
    /// Serve configs holding a cluster CA's private key (over TLS, unless
    /// `insecure_http_secrets` too).
    pub serve_ca_keys: bool,
}

/// What is served, with canonical paths.
#[derive(Debug, Clone)]
pub struct Site {
    pub root: PathBuf,
    pub configs: PathBuf,
}

impl Server {
    /// Checks the directories and binds `listen` (port 0 picks a free port).
    /// Without `configs`, node configs come from `<root>/configs`.
    pub fn bind(root: &Path, configs: Option<&Path>, listen: &str) -> Result<Server, ServeError> {
        let dir = |p: &Path, what: &str| -> Result<PathBuf, ServeError> {
            let c = p.canonicalize().map_err(|e| ServeError::Dir {
                path: p.to_path_buf(),
                reason: format!("{e}; give the {what}"),
            })?;
            if !c.is_dir() {
                return Err(ServeError::Dir {
                    path: p.to_path_buf(),
                    reason: format!("not a directory; give the {what}"),
                });
            }
            Ok(c)
        };
        let root = dir(
            root,
            "directory to serve, e.g. the pxe/ directory of a build output (out/<profile>/pxe)",
        )?;
        let configs = match configs {
            Some(c) => dir(c, "directory holding <mac>.toml node configs")?,
            // May not exist; requests for configs then get 404.
            None => root.join("configs"),
        };
        let listener = TcpListener::bind(listen).map_err(|source| ServeError::Listen {
            addr: listen.to_string(),
            source,
        })?;
        Ok(Server {
            listener,
            site: Arc::new(Site { root, configs }),
            opts: Arc::new(Options::default()),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn site(&self) -> &Site {
        &self.site
    }

    /// Sets TLS and the secrets policy.
    pub fn with_options(mut self, opts: Options) -> Server {
        self.opts = Arc::new(opts);
        self
    }

    /// Whether TLS is served.
    pub fn tls(&self) -> bool {
        self.opts.tls.is_some()
    }

    /// Serves forever; `log` gets one line per request.
    pub fn run(self, log: impl Fn(&str) + Send + Sync + 'static) -> std::io::Result<()> {
        let log = Arc::new(log);
        let busy = Arc::new(AtomicUsize::new(0));
        for conn in self.listener.incoming() {
            let stream = match conn {
                Ok(s) => s,
                // A client that gave up before accept; keep serving.
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
                Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {
                    log(&format!(
                        "kiln serve: accept: {e}; waiting for connections to close"
                    ));
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let (site, log, busy, opts) = (self.site.clone(), log.clone(), busy.clone(), self.opts.clone());
            if busy.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                busy.fetch_sub(1, Ordering::SeqCst);
                let _ = (&stream).write_all(
                    b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
                continue;
            }
            std::thread::spawn(move || {
                let line = serve_connection(&site, &opts, stream);
                // Logged before the connection closes, so a client that
                // waits for each answer sees the log in its order.
                log(&line);
                busy.fetch_sub(1, Ordering::SeqCst);
            });
        }
        Ok(())
    }
}

/// Anything a request can be read from and answered on.
trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

/// Sniffs TLS, serves the one request, closes; returns the log line.
fn serve_connection(site: &Site, opts: &Options, stream: TcpStream) -> String {
    let peer = stream.peer_addr().map(|a| a.ip().to_string()).unwrap_or_else(|_| "?".into());
    let local = stream.local_addr().ok();
    let _ = stream.set_read_timeout(Some(TIMEOUT));
    let _ = stream.set_write_timeout(Some(TIMEOUT));
    let mut first = [0u8; 1];
    let is_tls = matches!(stream.peek(&mut first), Ok(1) if first[0] == TLS_HANDSHAKE);
    if !is_tls {
        let mut stream = stream;
        return handle(site, opts, &mut stream, &peer, local, false);
    }
    let Some(cfg) = &opts.tls else {
        return format!("kiln serve: {peer} - - TLS handshake refused (this server has no certificate: start it with --tls-cert/--tls-key or --init-tls DIR)");
    };
    let conn = match rustls::ServerConnection::new(cfg.clone()) {
        Ok(c) => c,
        Err(e) => return format!("kiln serve: {peer} - - TLS: {e}"),
    };
    let mut tls = rustls::StreamOwned::new(conn, stream);
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            return format!("kiln serve: {peer} - - TLS handshake failed: {e}");
        }
    }
    let line = handle(site, opts, &mut tls, &peer, local, true);
    tls.conn.send_close_notify();
    let _ = tls.flush();
    line
}

/// A request, as far as the server cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// As sent: path and query.
    pub target: String,
    pub host: Option<String>,
}

/// Parses a request head. Arbitrary bytes give an error, never a panic.
pub fn parse_request(head: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(head).map_err(|_| "the request is not text".to_string())?;
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the request line is not `METHOD /path HTTP/1.x`".into());
    };
    if !version.starts_with("HTTP/1.") || method.is_empty() || target.is_empty() {
        return Err("the request line is not `METHOD /path HTTP/1.x`".into());
    }
    let mut host = None;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("host") {
                host = Some(v.trim().to_string());
            }
        }
    }
    Ok(Request {
        method: method.to_string(),
        target: target.to_string(),
        host,
    })
}

/// A MAC in any common spelling (colons, hyphens, bare, any case), as
/// lowercase with colons.
pub fn normalise_mac(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
    let seps: Vec<char> = s.chars().filter(|c| *c == ':' || *c == '-').collect();
    let well_formed = (seps.is_empty() && hex.len() == 12)
        || (seps.len() == 5
            && seps.iter().all(|c| *c == seps[0])
            && s.split(seps[0]).all(|p| p.len() == 2));
    if !well_formed || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let hex = hex.to_ascii_lowercase();
    Some(
        (0..6)
            .map(|i| &hex[2 * i..2 * i + 2])
            .collect::<Vec<_>>()
            .join(":"),
    )
}

/// `%XX` decoding of a path. None for bad escapes and for NUL.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    if out.contains(&0) {
        return None;
    }
    String::from_utf8(out).ok()
}

/// boot.ipxe with its `set kiln-server …` line(s) naming `server`, and
/// with `config_server` (this server's https:// address) its
/// `set kiln-config-server …` line(s).
pub fn rewrite_ipxe(script: &str, server: &str, config_server: Option<&str>) -> String {
    script
        .split_inclusive('\n')
        .map(|l| {
            let body = l.trim_end_matches(['\r', '\n']);
            let indent = &body[..body.len() - body.trim_start().len()];
            let line = body.trim_start();
            if line.starts_with(SERVER_LINE) {
                format!("{indent}{SERVER_LINE}{server}{}", &l[body.len()..])
            } else if let (true, Some(c)) = (line.starts_with(CONFIG_SERVER_LINE), config_server) {
                format!("{indent}{CONFIG_SERVER_LINE}{c}{}", &l[body.len()..])
            } else {
                l.to_string()
            }
        })
        .collect()
}

/// A Host header fit to paste into a script: host name or address and
/// port, nothing else.
fn clean_host(h: &str) -> Option<&str> {
    let ok = !h.is_empty()
        && h.len() <= 255
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]_".contains(c));
    ok.then_some(h)
}

/// What a path maps to.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    File(PathBuf),
    /// A node config: the files tried, in order, and the node's MAC.
    Config {
        candidates: Vec<PathBuf>,
        mac: Option<String>,
    },
    BadRequest(String),
    NotFound(String),
}

/// Maps a request path (without the query) to a file. Never leaves the
/// served directories: `..` is refused, and symlinks are checked by the
/// caller against the canonical root.
pub fn route(site: &Site, path: &str) -> Route {
    let Some(decoded) = percent_decode(path) else {
        return Route::BadRequest("bad %-escape in the path".into());
    };
    if !decoded.starts_with('/') {
        return Route::BadRequest("the path does not start with /".into());
    }
    let segs: Vec<&str> = decoded.split('/').filter(|s| !s.is_empty()).collect();
    if segs
        .iter()
        .any(|s| *s == ".." || *s == "." || s.contains('\\'))
    {
        return Route::BadRequest("the path leaves the served directory".into());
    }
    if segs.iter().any(|s| s.starts_with('.')) {
        return Route::NotFound("hidden files are not served".into());
    }
    if let ["configs", name] = segs.as_slice() {
        let (stem, suffix) = match name
            .strip_suffix(".toml.minisig")
            .map(|s| (s, ".toml.minisig"))
        {
            Some(x) => x,
            None => match name.strip_suffix(".toml") {
                Some(s) => (s, ".toml"),
                None => return Route::NotFound("node configs are <mac>.toml".into()),
            },
        };
        let mac = normalise_mac(stem);
        let names = match &mac {
            Some(m) => vec![m.clone(), m.replace(':', "-")],
            None => {
                let lower = stem.to_ascii_lowercase();
                if stem == lower {
                    vec![stem.to_string()]
                } else {
                    vec![stem.to_string(), lower]
                }
            }
        };
        let candidates = names
            .iter()
            .map(|n| site.configs.join(format!("{n}{suffix}")))
            .collect();
        return Route::Config { candidates, mac };
    }
    if segs.is_empty() {
        return Route::NotFound("no file named; try /boot.ipxe".into());
    }
    Route::File(segs.iter().fold(site.root.clone(), |p, s| p.join(s)))
}

/// A regular file under `base` (after symlinks), or why not.
fn open_under(base: &Path, p: &Path) -> Result<(std::fs::File, u64), String> {
    let c = p.canonicalize().map_err(|_| "no such file".to_string())?;
    let base = base
        .canonicalize()
        .map_err(|_| "no such directory".to_string())?;
    if !c.starts_with(&base) {
        return Err("it points outside the served directory".into());
    }
    let f = std::fs::File::open(&c).map_err(|e| e.to_string())?;
    let m = f.metadata().map_err(|e| e.to_string())?;
    if !m.is_file() {
        return Err("not a file".into());
    }
    Ok((f, m.len()))
}

fn content_type(p: &Path) -> &'static str {
    match p.extension().and_then(|e| e.to_str()) {
        Some("ipxe" | "toml" | "minisig" | "txt" | "cfg") => "text/plain; charset=utf-8",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

fn reason(code: u16) -> &'static str {
    match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Error",
    }
}

/// Reads the request head, up to the blank line.
fn read_head(stream: &mut dyn Conn) -> Result<Vec<u8>, u16> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(i);
            return Ok(buf);
        }
        if let Some(i) = buf.windows(2).position(|w| w == b"\n\n") {
            buf.truncate(i);
            return Ok(buf);
        }
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err(400),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return Err(408),
        }
    }
}

/// Serves one request; returns the log line.
fn handle(site: &Site, opts: &Options, stream: &mut dyn Conn, peer: &str, local: Option<SocketAddr>, secure: bool) -> String {
    let req = match read_head(stream).map(|h| parse_request(&h)) {
        Ok(Ok(r)) => r,
        Ok(Err(why)) => {
            let sent = respond_text(stream, 400, &why, false);
            return format!("kiln serve: {peer} - - 400 {sent} B ({why})");
        }
        Err(code) => {
            let sent = respond_text(stream, code, reason(code), false);
            return format!("kiln serve: {peer} - - {code} {sent} B");
        }
    };
    let host = req
        .host
        .as_deref()
        .and_then(clean_host)
        .map(str::to_string)
        .or_else(|| local.map(|a| a.to_string()))
        .unwrap_or_else(|| "localhost".into());
    let (path, query) = match req.target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (req.target.as_str(), None),
    };
    // Absolute-form targets (proxies) name the host; only the path matters.
    let path = match path.strip_prefix("http://").or_else(|| path.strip_prefix("https://")) {
        Some(rest) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => path,
    };
    let query_mac = query.and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("mac="))
            .and_then(percent_decode)
            .map(|m| {
                normalise_mac(&m).unwrap_or_else(|| {
                    m.chars()
                        .filter(|c| c.is_ascii_alphanumeric() || ":-".contains(*c))
                        .take(32)
                        .collect()
                })
            })
    });
    let head_only = req.method == "HEAD";
    let mut mac = query_mac;
    let mut note = String::new();
    let (code, sent) = if req.method != "GET" && !head_only {
        (
            405,
            respond_text(stream, 405, "only GET and HEAD", head_only),
        )
    } else {
        match route(site, path) {
            Route::BadRequest(why) => {
                note = format!(" ({why})");
                (400, respond_text(stream, 400, &why, head_only))
            }
            Route::NotFound(why) => {
                note = format!(" ({why})");
                (404, respond_text(stream, 404, &why, head_only))
            }
            Route::Config {
                candidates,
                mac: path_mac,
            } => {
                mac = path_mac.or(mac);
                match candidates
                    .iter()
                    .find_map(|c| open_under(&site.configs, c).ok().map(|f| (c, f)))
                {
                    Some((p, (f, len))) => match refuse_secrets(p, secure, opts) {
                        Some(why) => {
                            note = format!(" ({why})");
                            (403, respond_text(stream, 403, &why, head_only))
                        }
                        None => send_file(stream, p, f, len, head_only, &mut note),
                    },
                    None => {
                        let tried = candidates
                            .iter()
                            .map(|c| c.display().to_string())
                            .collect::<Vec<_>>()
                            .join(" or ");
                        note = format!(" (no node config: looked for {tried})");
                        let msg = format!("no node config for this node; looked for {tried}");
                        (404, respond_text(stream, 404, &msg, head_only))
                    }
                }
            }
            Route::File(p) => match open_under(&site.root, &p) {
                Err(why) => {
                    note = format!(" ({}: {why})", p.display());
                    (404, respond_text(stream, 404, &why, head_only))
                }
                Ok((mut f, _)) if p.file_name().is_some_and(|n| n == "boot.ipxe") => {
                    let mut script = String::new();
                    match f.read_to_string(&mut script) {
                        Ok(_) => {
                            let config_server = opts.tls.is_some().then(|| format!("https://{host}"));
                            let body = rewrite_ipxe(&script, &format!("http://{host}"), config_server.as_deref());
                            let ctype = content_type(&p);
                            (200, respond(stream, 200, ctype, body.as_bytes(), head_only))
                        }
                        Err(e) => {
                            note = format!(" ({}: {e})", p.display());
                            let msg = "cannot read boot.ipxe";
                            (500, respond_text(stream, 500, msg, head_only))
                        }
                    }
                }
                Ok((f, len)) => send_file(stream, &p, f, len, head_only, &mut note),
            },
        }
    };
    let mac = mac.map(|m| format!(" mac={m}")).unwrap_or_default();
    let note = if secure { format!(" tls{note}") } else { note };
    let target: String = req
        .target
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .take(512)
        .collect();
    format!(
        "kiln serve: {peer} {} {target} {code} {sent} B{mac}{note}",
        req.method
    )
}

/// Why a node config must not be sent on this connection: it holds a CA
/// key (never served unless allowed), or secrets and the connection is
/// plain HTTP (unless allowed).
fn refuse_secrets(path: &Path, secure: bool, opts: &Options) -> Option<String> {
    if path.extension().is_none_or(|e| e != "toml") {
        return None;
    }
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let keys = kiln_contract::config::secret_keys(&text);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if keys.contains(&"k0s.ca.key") && !opts.serve_ca_keys {
        return Some(format!(
            "{name} holds the cluster CA's private key (k0s.ca.key), which kiln serve does not put on a network: give the controller its config on local media (its ESP or a KILNCFG stick; kiln cluster init writes it as controller.local.toml), or start kiln serve with --serve-ca-keys"
        ));
    }
    if secure || opts.insecure_http_secrets {
        return None;
    }
    (!keys.is_empty()).then(|| {
        format!(
            "{name} holds secrets ({}) and this request is plain HTTP, where anyone on the network can read them: fetch it over https:// (start kiln serve with --init-tls DIR or --tls-cert/--tls-key, and put the CA in the image's node.trust), or start kiln serve with --insecure-http-secrets on a network you trust",
            keys.join(", ")
        )
    })
}

/// Streams a file; returns (status, body bytes sent).
fn send_file(
    stream: &mut dyn Conn,
    path: &Path,
    mut f: std::fs::File,
    len: u64,
    head_only: bool,
    note: &mut String,
) -> (u16, u64) {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: {}\r\nContent-Length: {len}\r\nCache-Control: no-cache\r\nConnection: close\r\n\r\n",
        content_type(path)
    );
    if stream.write_all(head.as_bytes()).is_err() || head_only {
        return (200, 0);
    }
    // std::io::copy from a File to a TcpStream uses sendfile on Linux.
    match std::io::copy(&mut (&mut f).take(len), stream) {
        Ok(n) => (200, n),
        Err(e) => {
            *note = format!(" (client went away: {e})");
            (200, 0)
        }
    }
}

fn respond_text(stream: &mut dyn Conn, code: u16, msg: &str, head_only: bool) -> u64 {
    let body = format!("{code} {}: {msg}\n", reason(code));
    respond(
        stream,
        code,
        "text/plain; charset=utf-8",
        body.as_bytes(),
        head_only,
    )
}

fn respond(stream: &mut dyn Conn, code: u16, ctype: &str, body: &[u8], head_only: bool) -> u64 {
    let mut w = BufWriter::new(stream);
    let allow = if code == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {code} {}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nCache-Control: no-cache\r\n{allow}Connection: close\r\n\r\n",
        reason(code),
        body.len()
    );
    let body = if head_only { &[][..] } else { body };
    let ok = w.write_all(head.as_bytes()).is_ok() && w.write_all(body).is_ok() && w.flush().is_ok();
    if ok {
        body.len() as u64
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn site() -> Site {
        Site {
            root: PathBuf::from("/srv/pxe"),
            configs: PathBuf::from("/srv/configs"),
        }
    }

    #[test]
    fn macs_in_any_spelling() {
        for s in [
            "52:54:00:12:34:56",
            "52-54-00-12-34-56",
            "52:54:00:12:34:56".to_uppercase().as_str(),
            "525400123456",
        ] {
            assert_eq!(
                normalise_mac(s).as_deref(),
                Some("52:54:00:12:34:56"),
                "{s}"
            );
        }
        for bad in [
            "52:54:00:12:34",
            "52:54-00:12:34:56",
            "5:254:00:12:34:56",
            "52:54:00:12:34:5g",
            "",
            "node1",
        ] {
            assert_eq!(normalise_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn routes() {
        let s = site();
        assert_eq!(
            route(&s, "/boot.ipxe"),
            Route::File("/srv/pxe/boot.ipxe".into())
        );
        assert_eq!(route(&s, "/a//b%20c"), Route::File("/srv/pxe/a/b c".into()));
        assert_eq!(
            route(&s, "/configs/52-54-00-12-34-AB.toml"),
            Route::Config {
                candidates: vec![
                    "/srv/configs/52:54:00:12:34:ab.toml".into(),
                    "/srv/configs/52-54-00-12-34-ab.toml".into()
                ],
                mac: Some("52:54:00:12:34:ab".into())
            }
        );
        assert_eq!(
            route(&s, "/configs/52:54:00:12:34:ab.toml.minisig"),
            Route::Config {
                candidates: vec![
                    "/srv/configs/52:54:00:12:34:ab.toml.minisig".into(),
                    "/srv/configs/52-54-00-12-34-ab.toml.minisig".into()
                ],
                mac: Some("52:54:00:12:34:ab".into())
            }
        );
        assert_eq!(
            route(&s, "/configs/4C4C-uuid.toml"),
            Route::Config {
                candidates: vec![
                    "/srv/configs/4C4C-uuid.toml".into(),
                    "/srv/configs/4c4c-uuid.toml".into()
                ],
                mac: None
            }
        );
        for bad in [
            "/../etc/passwd",
            "/a/../../x",
            "/%2e%2e/x",
            "/configs/..%2f..%2fetc.toml",
            "/a%00b",
            "/a%zz",
            "x",
            "/a\\..\\b",
        ] {
            assert!(
                matches!(route(&s, bad), Route::BadRequest(_)),
                "{bad}: {:?}",
                route(&s, bad)
            );
        }
        assert!(matches!(route(&s, "/.git/config"), Route::NotFound(_)));
        assert!(matches!(route(&s, "/"), Route::NotFound(_)));
        assert!(matches!(route(&s, "/configs/x.yaml"), Route::NotFound(_)));
    }

    #[test]
    fn ipxe_points_at_this_server() {
        let s = "#!ipxe\r\n  set kiln-server http://placeholder\r\nkernel ${kiln-server}/vmlinuz\nset kiln-server-x y\n";
        assert_eq!(
            rewrite_ipxe(s, "http://10.0.2.2:8080", None),
            "#!ipxe\r\n  set kiln-server http://10.0.2.2:8080\r\nkernel ${kiln-server}/vmlinuz\nset kiln-server-x y\n"
        );
        assert_eq!(
            rewrite_ipxe("set kiln-server x", "http://h", None),
            "set kiln-server http://h"
        );
        assert_eq!(clean_host("10.0.2.2:8080"), Some("10.0.2.2:8080"));
        assert_eq!(clean_host("[fd00::1]:80"), Some("[fd00::1]:80"));
        assert_eq!(clean_host("h\nchain http://evil/"), None);
        assert_eq!(clean_host(""), None);
    }

    #[test]
    fn requests() {
        let r = parse_request(
            b"GET /boot.ipxe HTTP/1.1\r\nhost: 10.0.2.2:8080\r\nUser-Agent: iPXE/1.21\r\n",
        )
        .unwrap();
        assert_eq!(
            (r.method.as_str(), r.target.as_str(), r.host.as_deref()),
            ("GET", "/boot.ipxe", Some("10.0.2.2:8080"))
        );
        assert!(parse_request(b"GET /x\r\n").is_err());
        assert!(parse_request(b"GET /x HTTP/2\r\n").is_err());
        assert!(parse_request(b"\xff\xfe").is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300), s in "\\PC{0,80}") {
            let _ = parse_request(&b);
            let _ = route(&site(), &s);
            let _ = normalise_mac(&s);
            let _ = percent_decode(&s);
            let _ = rewrite_ipxe(&s, "http://h", Some("https://h"));
        }

        #[test]
        fn routes_never_leave_the_directories(segs in proptest::collection::vec("(\\.\\.|\\.|%2[eE]|%2[fF]|[a-z]{1,3}|configs|/)+", 1..6)) {
            let p = format!("/{}", segs.join("/"));
            match route(&site(), &p) {
                Route::File(f) => prop_assert!(f.starts_with("/srv/pxe") && !f.components().any(|c| c == std::path::Component::ParentDir), "{p} -> {f:?}"),
                Route::Config { candidates, .. } => for c in candidates {
                    prop_assert!(c.parent() == Some(Path::new("/srv/configs")), "{p} -> {c:?}");
                },
                _ => {}
            }
        }
    }
}
