//! kiln_init::node::fetch::get against loopback servers this test runs:
//! plain and chunked answers, 404, redirects, oversize, truncated and slow
//! servers, and a refused connection.

use kiln_init::node::fetch::{get, FetchError, Options};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// What the test server does with one connection.
enum Answer {
    /// Writes these bytes and closes.
    Bytes(Vec<u8>),
    /// Reads the request, then says nothing for this long.
    Silent(Duration),
    /// Sends the head, then one body byte every `Duration`.
    Drip(Duration),
}

/// Serves one answer per connection, in order; the requests' heads come
/// back on the channel.
fn server(answers: Vec<Answer>) -> (u16, mpsc::Receiver<String>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for a in answers {
            let Ok((mut s, _)) = l.accept() else { return };
            let _ = tx.send(read_head(&mut s));
            match a {
                Answer::Bytes(b) => {
                    let _ = s.write_all(&b);
                }
                Answer::Silent(d) => thread::sleep(d),
                Answer::Drip(d) => {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n");
                    for _ in 0..1000 {
                        if s.write_all(b"x").is_err() {
                            break;
                        }
                        thread::sleep(d);
                    }
                }
            }
        }
    });
    (port, rx)
}

fn read_head(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut b = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") && s.read(&mut b).unwrap_or(0) == 1 {
        buf.push(b[0]);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn ok(body: &str) -> Answer {
    Answer::Bytes(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
}

fn quick() -> Options {
    Options {
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_millis(400),
        total_timeout: Duration::from_secs(2),
        ..Options::default()
    }
}

#[test]
fn fetches_a_config_and_sends_a_proper_request() {
    let (port, rx) = server(vec![ok("role = \"single\"\n")]);
    let url = format!("http://127.0.0.1:{port}/configs/52:54:00:12:34:56.toml");
    assert_eq!(get(&url, &quick()).unwrap(), b"role = \"single\"\n");
    let head = rx.recv().unwrap();
    assert!(
        head.starts_with("GET /configs/52:54:00:12:34:56.toml HTTP/1.1\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("\r\nHost: 127.0.0.1:{port}\r\n")),
        "{head}"
    );
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
}

#[test]
fn host_names_resolve() {
    let (port, _rx) = server(vec![ok("x")]);
    assert_eq!(
        get(&format!("http://localhost:{port}/"), &quick()).unwrap(),
        b"x"
    );
}

#[test]
fn chunked_answers() {
    let (port, _rx) = server(vec![Answer::Bytes(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n7\r\nrole = \r\n9\r\n\"single\"\n\r\n0\r\n\r\n".to_vec())]);
    assert_eq!(
        get(&format!("http://127.0.0.1:{port}/"), &quick()).unwrap(),
        b"role = \"single\"\n"
    );
}

#[test]
fn not_found_says_what_to_do() {
    let (port, _rx) = server(vec![Answer::Bytes(
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 9\r\n\r\nnot found".to_vec(),
    )]);
    let e = get(&format!("http://127.0.0.1:{port}/configs/x.toml"), &quick()).unwrap_err();
    assert_eq!(
        e,
        FetchError::Status {
            code: 404,
            reason: "Not Found".into()
        }
    );
    assert_eq!(format!("{e}; {}", e.hint()), "server answered 404 Not Found; put this node's config there (kiln serve --configs DIR serves DIR/<mac>.toml)");
}

#[test]
fn redirects_are_followed() {
    let (port2, rx2) = server(vec![ok("moved")]);
    let (port, _rx) = server(vec![Answer::Bytes(format!("HTTP/1.1 302 Found\r\nLocation: http://127.0.0.1:{port2}/new.toml\r\nContent-Length: 0\r\n\r\n").into_bytes())]);
    assert_eq!(
        get(&format!("http://127.0.0.1:{port}/old.toml"), &quick()).unwrap(),
        b"moved"
    );
    assert!(rx2.recv().unwrap().starts_with("GET /new.toml "));
}

#[test]
fn oversize_and_truncated_answers_are_refused() {
    let big = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", 2 << 20).into_bytes();
    let mut endless = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
    endless.resize(endless.len() + (2 << 20), b'a');
    let (port, _rx) = server(vec![
        Answer::Bytes(big),
        Answer::Bytes(endless),
        Answer::Bytes(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc".to_vec()),
        Answer::Bytes(Vec::new()),
    ]);
    let url = format!("http://127.0.0.1:{port}/");
    assert_eq!(get(&url, &quick()), Err(FetchError::TooLarge(1 << 20)));
    assert_eq!(get(&url, &quick()), Err(FetchError::TooLarge(1 << 20)));
    match get(&url, &quick()) {
        Err(FetchError::Truncated(why)) => assert!(why.contains("3 of the 10"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(get(&url, &quick()), Err(FetchError::Truncated(_))));
}

#[test]
fn slow_servers_time_out() {
    let (port, _rx) = server(vec![
        Answer::Silent(Duration::from_secs(3)),
        Answer::Drip(Duration::from_millis(100)),
    ]);
    let url = format!("http://127.0.0.1:{port}/");
    let t = Instant::now();
    assert!(matches!(get(&url, &quick()), Err(FetchError::Timeout(_))));
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    // Each byte comes within the read timeout, but the whole takes too long.
    let t = Instant::now();
    assert!(matches!(get(&url, &quick()), Err(FetchError::Timeout(_))));
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn refused_connections_name_the_address() {
    let port = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    match get(&format!("http://127.0.0.1:{port}/x.toml"), &quick()) {
        Err(e @ FetchError::Connect { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
            assert!(e.hint().contains("server is running"));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn https_urls_default_to_port_443() {
    // Fetching over TLS is tested in tests/https.rs.
    let u = kiln_init::node::fetch::Url::parse("https://boot.example/a.toml").unwrap();
    assert_eq!((u.https, u.port, u.to_string().as_str()), (true, 443, "https://boot.example/a.toml"));
    let u = kiln_init::node::fetch::Url::parse("https://boot.example:8443/a.toml").unwrap();
    assert_eq!(u.to_string(), "https://boot.example:8443/a.toml");
}
