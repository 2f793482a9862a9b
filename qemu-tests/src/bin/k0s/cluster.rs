//! Proving a pair of nodes fits together, without pretending to be k0s.
//!
//! A controller stand-in reads the bootstrap-token Secrets in
//! `<data-dir>/manifests/*/*.yaml` (where k0s would apply them from), and
//! listens on 6443 and 9443 for a one-line protocol of its own:
//!
//! ```text
//! worker:     kiln-standin join <token-id> <token-secret>
//! controller: kiln-standin answer=<ok|unknown-id|bad-secret|not-for-authentication|bad-request> id=<token-id>
//! ```
//!
//! A worker stand-in decodes its join token, connects to the server in it
//! (retrying for a bounded time, the controller may still be booting) and
//! prints the answer. This is not the Kubernetes API and nothing here is TLS.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cli::{Role, RunOpts, TokenSource};
use crate::out::{say, Report};
use crate::token;

pub const PORTS: [u16; 2] = [6443, 9443];
const MAGIC: &str = "kiln-standin";
/// How long a worker keeps trying to reach its controller.
pub const JOIN_FOR: Duration = Duration::from_secs(600);
const RETRY_EVERY: Duration = Duration::from_secs(3);
const MAX_MANIFEST: u64 = 1 << 20;

/// A bootstrap token Secret found in a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapSecret {
    pub id: String,
    pub secret: String,
    /// `usage-bootstrap-authentication: "true"`: the API server accepts it
    /// as a bearer token (what a worker's kubelet needs).
    pub authentication: bool,
    pub expiration: Option<String>,
    pub path: PathBuf,
}

fn unquote(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
        .unwrap_or(v)
}

fn indent(l: &str) -> usize {
    l.len() - l.trim_start_matches(' ').len()
}

/// The top-level scalars and the direct children of the `metadata`,
/// `data` and `stringData` maps of one YAML document, which is all a
/// Secret manifest needs. Anything fancier (flow maps, block scalars) is
/// not read.
#[derive(Debug, Default)]
struct Doc {
    top: Vec<(String, String)>,
    maps: Vec<(String, Vec<(String, String)>)>,
}

impl Doc {
    fn parse(text: &str) -> Doc {
        let mut d = Doc::default();
        let mut section: Option<(String, Option<usize>)> = None;
        for l in text.lines() {
            let t = l.trim();
            if t.is_empty() || t.starts_with('#') {
                continue;
            }
            let Some((k, v)) = t.split_once(':') else {
                continue;
            };
            let (k, v) = (unquote(k).to_string(), unquote(v).to_string());
            if indent(l) == 0 {
                if v.is_empty() {
                    d.maps.push((k.clone(), Vec::new()));
                    section = Some((k, None));
                } else {
                    d.top.push((k, v));
                    section = None;
                }
                continue;
            }
            let Some((_, child)) = section.as_mut() else {
                continue;
            };
            let want = *child.get_or_insert(indent(l));
            if indent(l) == want {
                if let Some(m) = d.maps.last_mut() {
                    m.1.push((k, v));
                }
            }
        }
        d
    }

    fn top(&self, key: &str) -> Option<&str> {
        self.top
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn map(&self, name: &str, key: &str) -> Option<&str> {
        self.maps
            .iter()
            .filter(|(n, _)| n == name)
            .flat_map(|(_, m)| m.iter())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// A Secret value: `stringData` wins over base64 `data`, as in the API.
    fn secret_value(&self, key: &str) -> Result<Option<String>, String> {
        if let Some(v) = self.map("stringData", key) {
            return Ok(Some(v.to_string()));
        }
        match self.map("data", key) {
            None => Ok(None),
            Some(b) => {
                let raw = token::base64_decode(b).map_err(|e| format!("data.{key}: {e}"))?;
                String::from_utf8(raw)
                    .map(Some)
                    .map_err(|_| format!("data.{key} is not text"))
            }
        }
    }
}

/// The bootstrap token Secrets in a manifest file's text (documents split
/// on `---`). Other objects are skipped; a bootstrap Secret that is not
/// well-formed is an error naming what is wrong.
pub fn bootstrap_secrets(text: &str, path: &Path) -> Vec<Result<BootstrapSecret, String>> {
    let mut out = Vec::new();
    let mut docs: Vec<String> = vec![String::new()];
    for l in text.lines() {
        if l.trim_end() == "---" {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(l);
            d.push('\n');
        }
    }
    for text in docs {
        let d = Doc::parse(&text);
        if d.top("kind") != Some("Secret") || d.top("type") != Some("bootstrap.kubernetes.io/token")
        {
            continue;
        }
        out.push((|| {
            let name = d
                .map("metadata", "name")
                .ok_or("a bootstrap Secret without metadata.name")?;
            let id = d
                .secret_value("token-id")?
                .ok_or(format!("{name}: no token-id"))?;
            let secret = d
                .secret_value("token-secret")?
                .ok_or(format!("{name}: no token-secret"))?;
            if token::split_bootstrap(&format!("{id}.{secret}")).is_none() {
                return Err(format!(
                    "{name}: token-id and token-secret are not [a-z0-9]{{6}} and [a-z0-9]{{16}}"
                ));
            }
            if name != format!("bootstrap-token-{id}") {
                return Err(format!("{name}: the name must be bootstrap-token-{id}"));
            }
            let authentication =
                d.secret_value("usage-bootstrap-authentication")?.as_deref() == Some("true");
            Ok(BootstrapSecret {
                id,
                secret,
                authentication,
                expiration: d.secret_value("expiration")?,
                path: path.to_path_buf(),
            })
        })());
    }
    out
}

/// Every bootstrap Secret in `<data_dir>/manifests/*/*.yaml`, with the
/// problems found on the way.
pub fn scan(data_dir: &str) -> (Vec<BootstrapSecret>, Vec<String>) {
    let (mut found, mut problems) = (Vec::new(), Vec::new());
    let root = Path::new(data_dir).join("manifests");
    let Ok(stacks) = fs::read_dir(&root) else {
        return (found, problems);
    };
    let mut files: Vec<PathBuf> = stacks
        .flatten()
        .filter(|e| e.path().is_dir())
        .flat_map(|e| fs::read_dir(e.path()).into_iter().flatten().flatten())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    for p in files {
        let mut text = String::new();
        if let Err(e) =
            fs::File::open(&p).and_then(|f| f.take(MAX_MANIFEST).read_to_string(&mut text))
        {
            problems.push(format!("{}: {e}", p.display()));
            continue;
        }
        for r in bootstrap_secrets(&text, &p) {
            match r {
                Ok(s) => found.push(s),
                Err(e) => problems.push(format!("{}: {e}", p.display())),
            }
        }
    }
    (found, problems)
}

/// What the controller answers to a join request.
pub fn answer(secrets: &[BootstrapSecret], id: &str, secret: &str) -> &'static str {
    match secrets.iter().find(|s| s.id == id) {
        None => "unknown-id",
        Some(s) if s.secret != secret => "bad-secret",
        Some(s) if !s.authentication => "not-for-authentication",
        Some(_) => "ok",
    }
}

pub fn request_line(id: &str, secret: &str) -> String {
    format!("{MAGIC} join {id} {secret}\n")
}

/// Parses `kiln-standin join <id> <secret>`.
pub fn parse_request(line: &str) -> Option<(String, String)> {
    let mut w = line.split_whitespace();
    match (w.next(), w.next(), w.next(), w.next(), w.next()) {
        (Some(MAGIC), Some("join"), Some(id), Some(secret), None) => {
            token::split_bootstrap(&format!("{id}.{secret}"))
        }
        _ => None,
    }
}

/// Parses `kiln-standin answer=<a> id=<id>` into the answer.
pub fn parse_answer(line: &str) -> Option<String> {
    let mut w = line.split_whitespace();
    if w.next() != Some(MAGIC) {
        return None;
    }
    w.find_map(|f| f.strip_prefix("answer="))
        .map(str::to_string)
}

fn handle(mut conn: TcpStream, peer: SocketAddr, port: u16, data_dir: &str) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(10)));
    let mut line = String::new();
    let read = BufReader::new(&conn).take(256).read_line(&mut line);
    let (id, ans) = match read.ok().and_then(|_| parse_request(&line)) {
        // Read the manifests again: k0s applies them as they change.
        Some((id, secret)) => {
            let a = answer(&scan(data_dir).0, &id, &secret);
            (id, a)
        }
        None => ("-".to_string(), "bad-request"),
    };
    say(&format!(
        "join from {peer} on port {port} id={id} answer={ans}"
    ));
    let _ = conn.write_all(format!("{MAGIC} answer={ans} id={id}\n").as_bytes());
}

fn listen(port: u16, data_dir: String) {
    match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => {
            std::thread::spawn(move || {
                for conn in l.incoming().flatten() {
                    let peer = conn
                        .peer_addr()
                        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
                    handle(conn, peer, port, &data_dir);
                }
            });
        }
        Err(e) => say(&format!("cannot listen on port {port}: {e}")),
    }
}

/// Reads the token text from its source.
fn token_text(src: &TokenSource) -> Result<String, String> {
    match src {
        TokenSource::File(p) => fs::read_to_string(p).map_err(|e| format!("{p}: {e}")),
        TokenSource::Argument(t) | TokenSource::Env(t) => Ok(t.clone()),
    }
}

/// The server (`host:port`) and bootstrap token (id, secret) of a join token.
pub fn join_target(tok: &str) -> Result<(String, String, String), String> {
    let kc = token::decode(tok)?;
    let server = token::kubeconfig_info(&kc)?.server;
    let addr = token::server_addr(&server)?;
    let t = token::kubeconfig_token(&kc).ok_or("the token's kubeconfig has no user token")?;
    let (id, secret) = token::split_bootstrap(&t)
        .ok_or("the token's user token is not a bootstrap token <id>.<secret>")?;
    Ok((addr, id, secret))
}

fn try_join(addr: &str, id: &str, secret: &str) -> Result<String, String> {
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| format!("resolving {addr}: {e}"))?
        .next()
        .ok_or(format!("{addr} resolves to nothing"))?;
    let mut s =
        TcpStream::connect_timeout(&sa, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(request_line(id, secret).as_bytes())
        .map_err(|e| e.to_string())?;
    let mut line = String::new();
    BufReader::new(&s)
        .take(256)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    parse_answer(&line).ok_or_else(|| format!("unexpected answer {:?}", line.trim()))
}

fn join(addr: String, id: String, secret: String) {
    say(&format!(
        "joining controller {addr} id={id} (retrying for up to {} s)",
        JOIN_FOR.as_secs()
    ));
    let deadline = Instant::now() + JOIN_FOR;
    let mut last = String::new();
    while Instant::now() < deadline {
        match try_join(&addr, &id, &secret) {
            Ok(a) => {
                say(&format!("reached controller {addr} answer={a}"));
                return;
            }
            Err(e) => last = e,
        }
        std::thread::sleep(RETRY_EVERY);
    }
    say(&format!(
        "controller {addr} not reached in {} s: {last}",
        JOIN_FOR.as_secs()
    ));
}

/// A controller reports its bootstrap Secrets (and checks that the CA they
/// need is in place) and starts listening; a worker starts joining.
pub fn start(opts: &RunOpts, r: &mut Report) {
    let data_dir = opts.data_dir().to_string();
    if opts.role() != Role::Worker {
        let (found, problems) = scan(&data_dir);
        for p in &problems {
            say(&format!("bootstrap-secret problem: {p}"));
        }
        for s in &found {
            say(&format!(
                "bootstrap-secret id={} found in {} authentication={} expiration={}",
                s.id,
                s.path.display(),
                s.authentication,
                s.expiration.as_deref().unwrap_or("none")
            ));
        }
        if !found.is_empty() {
            // A pre-shared token carries the CA; k0s must find the same one.
            let ca = Path::new(&data_dir).join("pki/ca.crt");
            r.check(
                "cluster-ca",
                match fs::read_to_string(&ca) {
                    Ok(t) if t.starts_with("-----BEGIN CERTIFICATE-----") => Ok(()),
                    Ok(_) => Err(format!("{} is not a PEM certificate", ca.display())),
                    Err(e) => Err(format!(
                        "{}: {e} (a pre-shared token needs the CA it was made with)",
                        ca.display()
                    )),
                },
            );
        }
        for p in PORTS {
            listen(p, data_dir.clone());
        }
        say(&format!(
            "listening on ports {} for `{MAGIC} join` (a test protocol, not the Kubernetes API)",
            PORTS.map(|p| p.to_string()).join(",")
        ));
        return;
    }
    let Some(src) = &opts.token else { return };
    match token_text(src).and_then(|t| join_target(&t)) {
        Ok((addr, id, secret)) => {
            std::thread::spawn(move || join(addr, id, secret));
        }
        Err(e) => say(&format!("not joining: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const K0S_SECRET: &str = "apiVersion: v1
data:
  description: V29ya2VyIGJvb3RzdHJhcCB0b2tlbiBnZW5lcmF0ZWQgYnkgazBz
  token-id: YWJjZGVm
  token-secret: MDEyMzQ1Njc4OWFiY2RlZg==
  usage-bootstrap-authentication: dHJ1ZQ==
kind: Secret
metadata:
  creationTimestamp: null
  name: bootstrap-token-abcdef
  namespace: kube-system
type: bootstrap.kubernetes.io/token
";

    /// The older `k0s token pre-shared` shape: stringData, more usages.
    const K0S_130_SECRET: &str = "apiVersion: v1
kind: Secret
metadata:
  name: bootstrap-token-ghijkl
  namespace: kube-system
stringData:
  description: Worker bootstrap token generated by k0s
  token-id: ghijkl
  token-secret: \"0123456789abcdef\"
  usage-bootstrap-api-auth: \"true\"
  usage-bootstrap-api-worker-calls: \"true\"
  usage-bootstrap-authentication: \"true\"
type: bootstrap.kubernetes.io/token
";

    fn p() -> &'static Path {
        Path::new("/m/s/a.yaml")
    }

    #[test]
    fn reads_both_secret_shapes() {
        let s = bootstrap_secrets(K0S_SECRET, p());
        assert_eq!(
            s,
            vec![Ok(BootstrapSecret {
                id: "abcdef".into(),
                secret: "0123456789abcdef".into(),
                authentication: true,
                expiration: None,
                path: p().into()
            })]
        );
        let both =
            format!("{K0S_SECRET}---\n{K0S_130_SECRET}---\napiVersion: v1\nkind: ConfigMap\n");
        let s: Vec<_> = bootstrap_secrets(&both, p())
            .into_iter()
            .map(Result::unwrap)
            .collect();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[1].id.as_str(), s[1].secret.as_str(), s[1].authentication),
            ("ghijkl", "0123456789abcdef", true)
        );
    }

    #[test]
    fn bad_secrets_say_why() {
        let renamed = K0S_SECRET.replace("name: bootstrap-token-abcdef", "name: other");
        let e = bootstrap_secrets(&renamed, p()).remove(0).unwrap_err();
        assert!(e.contains("bootstrap-token-abcdef"), "{e}");
        let short = K0S_SECRET.replace("YWJjZGVm", "YWJj");
        assert!(bootstrap_secrets(&short, p())
            .remove(0)
            .unwrap_err()
            .contains("[a-z0-9]"));
        let garbage = K0S_SECRET.replace("YWJjZGVm", "!!");
        assert!(bootstrap_secrets(&garbage, p())
            .remove(0)
            .unwrap_err()
            .contains("data.token-id"));
        let no_auth = K0S_SECRET.replace("  usage-bootstrap-authentication: dHJ1ZQ==\n", "");
        assert!(
            !bootstrap_secrets(&no_auth, p())
                .remove(0)
                .unwrap()
                .authentication
        );
        assert!(bootstrap_secrets("kind: Secret\ntype: Opaque\n", p()).is_empty());
        // Nested maps under data are not its children.
        let d = Doc::parse("metadata:\n  labels:\n    name: x\n  name: y\n");
        assert_eq!(d.map("metadata", "name"), Some("y"));
    }

    #[test]
    fn answers() {
        let s = bootstrap_secrets(K0S_SECRET, p()).remove(0).unwrap();
        let mut no_auth = s.clone();
        no_auth.id = "zzzzzz".into();
        no_auth.authentication = false;
        let all = [s, no_auth];
        assert_eq!(answer(&all, "abcdef", "0123456789abcdef"), "ok");
        assert_eq!(answer(&all, "abcdef", "0123456789abcdee"), "bad-secret");
        assert_eq!(answer(&all, "qqqqqq", "0123456789abcdef"), "unknown-id");
        assert_eq!(
            answer(&all, "zzzzzz", "0123456789abcdef"),
            "not-for-authentication"
        );
    }

    #[test]
    fn protocol_lines() {
        let l = request_line("abcdef", "0123456789abcdef");
        assert_eq!(l, "kiln-standin join abcdef 0123456789abcdef\n");
        assert_eq!(
            parse_request(&l),
            Some(("abcdef".into(), "0123456789abcdef".into()))
        );
        for bad in [
            "",
            "kiln-standin join abcdef",
            "GET / HTTP/1.1",
            "kiln-standin join abcdef 0123456789abcdef x",
            "kiln-standin join ABCDEF 0123456789abcdef",
        ] {
            assert_eq!(parse_request(bad), None, "{bad}");
        }
        assert_eq!(
            parse_answer("kiln-standin answer=ok id=abcdef\n").as_deref(),
            Some("ok")
        );
        assert_eq!(parse_answer("HTTP/1.1 400 Bad Request"), None);
    }

    #[test]
    fn join_target_of_a_token() {
        let kc = "apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: QQ==\n    server: https://10.0.0.10:6443\n  name: k0s\ncontexts:\n- context:\n    cluster: k0s\n    user: kubelet-bootstrap\n  name: k0s\ncurrent-context: k0s\nkind: Config\npreferences: {}\nusers:\n- name: kubelet-bootstrap\n  user:\n    token: abcdef.0123456789abcdef\n";
        let tok = crate::token::tests::make_token(kc);
        assert_eq!(
            join_target(&tok).unwrap(),
            (
                "10.0.0.10:6443".into(),
                "abcdef".into(),
                "0123456789abcdef".into()
            )
        );
        let no_token = crate::token::tests::make_token(
            &kc.replace("token: abcdef.0123456789abcdef", "token: x"),
        );
        assert!(join_target(&no_token)
            .unwrap_err()
            .contains("bootstrap token"));
    }

    /// The whole exchange over loopback: a controller stand-in's handler
    /// against a worker's request.
    #[test]
    fn exchange_over_tcp() {
        let dir = std::env::temp_dir().join(format!("kiln-standin-cluster-{}", std::process::id()));
        fs::create_dir_all(dir.join("manifests/kiln-cluster")).unwrap();
        fs::write(
            dir.join("manifests/kiln-cluster/bootstrap-token-abcdef.yaml"),
            K0S_SECRET,
        )
        .unwrap();
        let data_dir = dir.to_string_lossy().into_owned();
        let (found, problems) = scan(&data_dir);
        assert_eq!((found.len(), problems.len()), (1, 0), "{problems:?}");
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let dd = data_dir.clone();
        let server = std::thread::spawn(move || {
            for _ in 0..2 {
                let (c, peer) = l.accept().unwrap();
                handle(c, peer, addr.port(), &dd);
            }
        });
        assert_eq!(
            try_join(&addr.to_string(), "abcdef", "0123456789abcdef").unwrap(),
            "ok"
        );
        assert_eq!(
            try_join(&addr.to_string(), "abcdef", "xxxxxxxxxxxxxxxx").unwrap(),
            "bad-secret"
        );
        server.join().unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn arbitrary_text_never_panics() {
        let mut rng = crate::cli::tests::Rng::new(7);
        let pieces = [
            "kind: Secret\n",
            "type: bootstrap.kubernetes.io/token\n",
            "data:\n",
            "stringData:\n",
            "metadata:\n",
            "  name: bootstrap-token-abcdef\n",
            "  token-id: ",
            "YWJjZGVm",
            "\"",
            "---\n",
            " ",
            ":",
            "\n",
            "é",
        ];
        for _ in 0..20_000 {
            let s = rng.string(&pieces);
            let _ = bootstrap_secrets(&s, p());
            let _ = parse_request(&s);
            let _ = parse_answer(&s);
        }
    }
}
