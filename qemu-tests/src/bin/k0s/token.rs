//! Join tokens: base64 of a gzipped kubeconfig (K0S-CONTRACT.md, "Tokens").

use std::io::Read;

/// Decompressed tokens are a few kilobytes; this bounds a hostile one.
const MAX_KUBECONFIG: u64 = 1 << 20;

/// Decodes standard base64 (the URL-safe alphabet is accepted too).
/// Whitespace is skipped, so a token file may end in a newline or be wrapped.
pub fn base64_decode(input: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(input.len() / 4 * 3);
    let mut acc: u32 = 0;
    let mut bits: u32 = 0;
    let mut digits: usize = 0;
    let mut pad: usize = 0;
    for (i, b) in input.bytes().enumerate() {
        if b.is_ascii_whitespace() {
            continue;
        }
        if b == b'=' {
            pad += 1;
            if pad > 2 {
                return Err(format!("too much base64 padding at byte {i}"));
            }
            continue;
        }
        if pad > 0 {
            return Err(format!("base64 data after padding at byte {i}"));
        }
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return Err(format!("invalid base64 byte {b:#04x} at byte {i}")),
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        digits += 1;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    if digits % 4 == 1 {
        return Err("base64 is truncated".to_string());
    }
    // Padding completes the last group: two digits take "==", three take "=".
    if pad > 0 && digits % 4 + pad != 4 {
        return Err("base64 padding does not match the length".to_string());
    }
    Ok(out)
}

pub fn gunzip(data: &[u8], limit: u64) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| format!("not gzip: {e}"))?;
    if out.len() as u64 > limit {
        return Err(format!("decompresses to more than {limit} bytes"));
    }
    Ok(out)
}

/// Token text to the kubeconfig inside it.
pub fn decode(token: &str) -> Result<String, String> {
    let gz = base64_decode(token).map_err(|e| format!("token is not base64: {e}"))?;
    let kc = gunzip(&gz, MAX_KUBECONFIG).map_err(|e| format!("token is base64 but {e}"))?;
    Ok(String::from_utf8_lossy(&kc).into_owned())
}

#[derive(Debug, PartialEq, Eq)]
pub struct TokenInfo {
    pub server: String,
    /// None when the kubeconfig names no user.
    pub user: Option<String>,
}

fn yaml_value(v: &str) -> &str {
    let v = v.trim();
    v.strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .or_else(|| v.strip_prefix('\'').and_then(|s| s.strip_suffix('\'')))
        .unwrap_or(v)
}

/// Reads the server URL and user of a token's kubeconfig by line matching.
/// k0s writes it itself, so its shape is known: `server:` under
/// `clusters:`, and `user: <name>` in the context.
pub fn kubeconfig_info(kc: &str) -> Result<TokenInfo, String> {
    if !kc.lines().any(|l| l.trim_end() == "clusters:") {
        return Err("the token's kubeconfig has no `clusters:`".to_string());
    }
    let server = kc
        .lines()
        .find_map(|l| l.trim().strip_prefix("server:").map(yaml_value))
        .ok_or("the token's kubeconfig has no `server:`")?;
    if !server.starts_with("https://") {
        return Err(format!("the token's server is {server:?}, want https://…"));
    }
    let context_user = kc.lines().find_map(|l| {
        let v = yaml_value(l.trim().strip_prefix("user:")?);
        (!v.is_empty()).then_some(v)
    });
    let user = context_user
        .or_else(|| users_value(kc, "- name:"))
        .map(str::to_string);
    Ok(TokenInfo {
        server: server.to_string(),
        user,
    })
}

/// The value of the first line under the top-level `users:` that starts
/// with `prefix` (once trimmed).
fn users_value<'a>(kc: &'a str, prefix: &str) -> Option<&'a str> {
    let mut in_users = false;
    for l in kc.lines() {
        if !l.starts_with(' ') && !l.starts_with('-') {
            in_users = l.trim_end() == "users:";
            continue;
        }
        if in_users {
            if let Some(v) = l.trim().strip_prefix(prefix) {
                return Some(yaml_value(v));
            }
        }
    }
    None
}

/// The bearer token of the kubeconfig's user (`token: <id>.<secret>`).
pub fn kubeconfig_token(kc: &str) -> Option<String> {
    users_value(kc, "token:")
        .filter(|t| !t.is_empty())
        .map(str::to_string)
}

/// A Kubernetes bootstrap token, `[a-z0-9]{6}.[a-z0-9]{16}`: (id, secret).
pub fn split_bootstrap(token: &str) -> Option<(String, String)> {
    let (id, secret) = token.split_once('.')?;
    let ok = |p: &str, n: usize| {
        p.len() == n
            && p.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    };
    (ok(id, 6) && ok(secret, 16)).then(|| (id.to_string(), secret.to_string()))
}

/// The host and port of an `https://host[:port][/path]` server URL, as
/// `host:port` for connecting (an IPv6 host keeps its brackets).
pub fn server_addr(server: &str) -> Result<String, String> {
    let rest = server
        .strip_prefix("https://")
        .ok_or_else(|| format!("server {server:?} is not https://…"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return Err(format!("server {server:?} has no host"));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("server {server:?}: unclosed `[`"))?;
        (format!("[{h}]"), after.strip_prefix(':'))
    } else {
        match authority.split_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (authority.to_string(), None),
        }
    };
    let port: u16 = match port {
        None => 443,
        Some(p) => p
            .parse()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("server {server:?}: bad port {p:?}"))?,
    };
    if host.is_empty() || host == "[]" {
        return Err(format!("server {server:?} has no host"));
    }
    Ok(format!("{host}:{port}"))
}

#[cfg(test)]
pub mod tests {
    use super::*;
    use std::io::Write;

    pub const KUBECONFIG: &str = "apiVersion: v1
clusters:
- cluster:
    server: https://10.0.2.15:6443
    certificate-authority-data: LS0tLS1CRUdJTi==
  name: k0s
contexts:
- context:
    cluster: k0s
    user: kubelet-bootstrap
  name: k0s
current-context: k0s
kind: Config
preferences: {}
users:
- name: kubelet-bootstrap
  user:
    token: abcdef.0123456789abcdef
";

    pub fn base64_encode(data: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut s = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for k in 0..4 {
                if k <= chunk.len() {
                    s.push(A[(n >> (18 - 6 * k) & 63) as usize] as char);
                } else {
                    s.push('=');
                }
            }
        }
        s
    }

    pub fn make_token(kubeconfig: &str) -> String {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(kubeconfig.as_bytes()).unwrap();
        base64_encode(&gz.finish().unwrap())
    }

    #[test]
    fn base64_round_trips() {
        for len in 0..40 {
            let data: Vec<u8> = (0..len).map(|i| (i * 37 + 11) as u8).collect();
            let enc = base64_encode(&data);
            assert_eq!(base64_decode(&enc).unwrap(), data, "{enc}");
            // Unpadded and wrapped forms decode the same.
            assert_eq!(base64_decode(enc.trim_end_matches('=')).unwrap(), data);
            let wrapped: String = enc.chars().flat_map(|c| [c, '\n']).collect();
            assert_eq!(base64_decode(&wrapped).unwrap(), data);
        }
        assert_eq!(base64_decode("aGVsbG8=\n").unwrap(), b"hello");
        assert_eq!(
            base64_decode("_-8=").unwrap(),
            base64_decode("/+8=").unwrap()
        );
    }

    #[test]
    fn base64_refuses_garbage() {
        assert!(base64_decode("a").is_err());
        assert!(base64_decode("ab=c").is_err());
        assert!(base64_decode("ab===").is_err());
        assert!(base64_decode("abc=d===").is_err());
        assert!(base64_decode("ab*d").is_err());
        assert!(base64_decode("abc==").is_err());
        assert!(base64_decode("é").is_err());
    }

    #[test]
    fn token_decodes_to_server_and_user() {
        let tok = make_token(KUBECONFIG);
        let kc = decode(&format!("{tok}\n")).unwrap();
        assert_eq!(
            kubeconfig_info(&kc).unwrap(),
            TokenInfo {
                server: "https://10.0.2.15:6443".into(),
                user: Some("kubelet-bootstrap".into())
            }
        );
        assert!(decode("aGVsbG8=").unwrap_err().contains("not gzip"));
        assert!(decode("!!").unwrap_err().contains("not base64"));
    }

    #[test]
    fn kubeconfig_shapes() {
        let no_ctx = "clusters:\n- cluster:\n    server: \"https://a:9443\"\nusers:\n- name: controller-bootstrap\n  user:\n    token: x\n";
        assert_eq!(
            kubeconfig_info(no_ctx).unwrap(),
            TokenInfo {
                server: "https://a:9443".into(),
                user: Some("controller-bootstrap".into())
            }
        );
        assert!(kubeconfig_info("clusters:\n- cluster:\n    server: http://a\n").is_err());
        assert!(kubeconfig_info("server: https://a\n").is_err());
        assert!(kubeconfig_info("clusters:\n").is_err());
        assert_eq!(
            kubeconfig_info("clusters:\n- cluster:\n    server: https://a\n")
                .unwrap()
                .user,
            None
        );
    }

    #[test]
    fn token_and_server_of_a_kubeconfig() {
        assert_eq!(
            kubeconfig_token(KUBECONFIG).as_deref(),
            Some("abcdef.0123456789abcdef")
        );
        assert_eq!(kubeconfig_token("users:\n- name: x\n  user: {}\n"), None);
        assert_eq!(kubeconfig_token("token: a.b\n"), None, "only under users:");
        assert_eq!(
            split_bootstrap("abcdef.0123456789abcdef"),
            Some(("abcdef".into(), "0123456789abcdef".into()))
        );
        for bad in [
            "abcdef",
            "abcde.0123456789abcdef",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789abcdeF",
            "abcdef.0123456789abcdefg",
        ] {
            assert_eq!(split_bootstrap(bad), None, "{bad}");
        }
        assert_eq!(
            server_addr("https://10.0.0.10:6443").unwrap(),
            "10.0.0.10:6443"
        );
        assert_eq!(
            server_addr("https://10.0.0.10:6443/").unwrap(),
            "10.0.0.10:6443"
        );
        assert_eq!(
            server_addr("https://k8s.example").unwrap(),
            "k8s.example:443"
        );
        assert_eq!(
            server_addr("https://[fd00::1]:9443").unwrap(),
            "[fd00::1]:9443"
        );
        assert_eq!(server_addr("https://[fd00::1]").unwrap(), "[fd00::1]:443");
        for bad in [
            "http://a:1",
            "https://",
            "https://:6443",
            "https://a:0",
            "https://a:x",
            "https://[fd00::1",
            "https://u@a:1",
        ] {
            assert!(server_addr(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn gunzip_is_bounded() {
        let big = "x".repeat(5000);
        let tok = make_token(&big);
        let gz = base64_decode(&tok).unwrap();
        assert!(gunzip(&gz, 4999).is_err());
        assert_eq!(gunzip(&gz, 5000).unwrap().len(), 5000);
    }

    #[test]
    fn arbitrary_tokens_never_panic() {
        let mut rng = crate::cli::tests::Rng::new(42);
        let pieces = [
            "H4sI",
            "=",
            "==",
            "\n",
            "A",
            "/+",
            "-_",
            "clusters:\n",
            "server: https://x\n",
            "user:",
            "- name:",
        ];
        for _ in 0..20_000 {
            let s = rng.string(&pieces);
            let _ = decode(&s);
            let _ = kubeconfig_info(&s);
            let _ = kubeconfig_token(&s);
            let _ = server_addr(&s);
            let _ = split_bootstrap(&s);
        }
        // Valid base64 around truncated or corrupted gzip.
        let gz = base64_decode(&make_token(KUBECONFIG)).unwrap();
        for cut in 0..gz.len() {
            let _ = decode(&base64_encode(&gz[..cut]));
            let mut bad = gz.clone();
            bad[cut] ^= 0x5a;
            let _ = decode(&base64_encode(&bad));
        }
    }
}
