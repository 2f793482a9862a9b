//! The fuzz harnesses: one function per target, each feeding arbitrary
//! bytes to a parser PID 1 exposes to the outside (the network, a disk, an
//! update bundle, node.toml) and checking what is cheap to check.
//!
//! `init/fuzz/fuzz_targets/<target>.rs` calls `<target>(data)` under
//! cargo-fuzz (nightly); `init/tests/fuzz_corpora.rs` calls the same
//! function on every file of `init/fuzz/corpus/<target>/` on stable, so the
//! committed corpora (crashes found so far included) are replayed by every
//! `cargo test`. A panic here is a bug in the parser: in PID 1 it is a
//! kernel panic. See `init/fuzz/README.md`.

use std::io::{self, Cursor, Read, Write};
use std::sync::{Arc, OnceLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

use kiln_contract::config;
use kiln_contract::digest::{crc32, sha256};
use kiln_contract::install_image;
use kiln_contract::minisign::{self, vectors, PublicKey};
use kiln_contract::update::bundle::testing::ustar_entry;
use kiln_contract::update::{self, BundleReader, Policy};
use kiln_contract::verity::VeritySuperblock;

use crate::net::{dhcp, sntp};
use crate::node::fetch::{self, Parsed, Url};
use crate::node::update::channel;
use crate::node::{gpt, grow, tls, vardisk, volume};

/// A harness: arbitrary bytes in, a panic when the parser misbehaves.
pub type Harness = fn(&[u8]);

/// The targets, in the order `cargo fuzz list` shows them.
pub const TARGETS: &[(&str, Harness)] = &[
    ("bundle", bundle),
    ("dhcp", dhcp),
    ("gpt_mbr", gpt_mbr),
    ("http", http),
    ("index_yaml", index_yaml),
    ("minisign", minisign),
    ("node_toml", node_toml),
    ("sntp", sntp),
    ("tls", tls),
];

// ---------------------------------------------------------------------------
// Network: DHCP, SNTP, HTTP, TLS

/// A DHCP message (what the packet socket hands the client after the
/// IPv4/UDP framing) and the IPv4/UDP framing itself.
pub fn dhcp(data: &[u8]) {
    const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
    const SERVER: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 0, 2, 2);
    if let Some(d) = dhcp::decode_ip_udp(data) {
        assert!(d.payload.len() <= data.len());
        let again = dhcp::encode_ip_udp(d.src, d.dst, d.sport, d.dport, d.payload);
        assert_eq!(dhcp::decode_ip_udp(&again), Some(d), "IPv4/UDP framing does not round-trip");
        dhcp_message(d.payload, MAC, SERVER);
    }
    dhcp_message(data, MAC, SERVER);
}

fn dhcp_message(data: &[u8], mac: [u8; 6], server: std::net::Ipv4Addr) {
    let Ok(m) = dhcp::decode(data) else { return };
    let again = dhcp::decode(&dhcp::encode(&m));
    assert_eq!(again.as_ref(), Ok(&m), "decode → encode → decode changed the message");
    // Answer as the client would, in each state, with our own xid and MAC
    // so the checks behind `is_reply_for` run.
    let mut ours = m.clone();
    ours.xid = 7;
    ours.chaddr[..6].copy_from_slice(&mac);
    for msg in [&m, &ours] {
        if let Ok(l) = dhcp::lease_from_ack(msg, server) {
            assert!((1..=32).contains(&l.prefix));
            assert!(l.renew_secs <= l.rebind_secs && l.rebind_secs <= l.lease_secs);
            assert!(l.lease_secs >= dhcp::MIN_LEASE_SECS);
            let _ = l.on_link(server);
        }
        let mut a = dhcp::Acquire::new(mac, 7);
        let _ = a.on_reply(msg, server);
        let _ = a.on_reply(msg, server); // now REQUESTING, if it was an offer
        let renew = dhcp::Renew { mac, xid: 7, addr: msg.yiaddr, server };
        let _ = renew.on_reply(msg, std::net::Ipv4Addr::UNSPECIFIED);
    }
}

/// An SNTP reply, and the checks and offset math applied to it.
pub fn sntp(data: &[u8]) {
    let p = match sntp::decode(data) {
        Ok(p) => p,
        Err(_) => {
            assert!(data.len() < sntp::PACKET_LEN);
            return;
        }
    };
    assert_eq!(sntp::encode(&p)[..], data[..sntp::PACKET_LEN], "decode → encode changed the packet");
    for t in [p.reference, p.origin, p.receive, p.transmit] {
        let back = sntp::Timestamp::from_unix_nanos(t.to_unix_nanos());
        assert_eq!(back.0 >> 32, t.0 >> 32, "NTP seconds do not round-trip");
        assert!((t.0 & 0xffff_ffff) - (back.0 & 0xffff_ffff) <= 5, "NTP fraction drifts");
    }
    // With the origin the node sent (so the checks behind it run) and with
    // another one; sent and received at plausible and odd local times.
    let t1 = p.origin.to_unix_nanos();
    for (nonce, t1, t4) in [(p.origin, t1, t1 + 20_000_000), (p.origin, t1, t1 - 5), (sntp::Timestamp(1), 0, 0)] {
        if let Ok(s) = sntp::check_reply(data, nonce, t1, t4) {
            assert!(s.delay_ns >= 0);
            assert!((1..=15).contains(&s.stratum));
        }
    }
}

/// An HTTP/1.x answer as `fetch::get` and the update channel read it, and
/// the bytes as a URL (config URLs, redirects, index.yaml's urls).
pub fn http(data: &[u8]) {
    for max in [fetch::MAX_BODY, 16] {
        let open = fetch::parse_response(data, max, false);
        let closed = fetch::parse_response(data, max, true);
        for r in [&open, &closed] {
            if let Ok(Parsed::Done(resp)) = r {
                assert!(resp.body.len() <= max, "a body longer than max_body");
                assert!(resp.body.len() <= data.len());
                assert!((100..600).contains(&resp.code));
            }
        }
        // The end of the stream only ends a body without a length.
        if let Ok(Parsed::Done(a)) = &open {
            match &closed {
                Ok(Parsed::Done(b)) => assert_eq!(a, b, "the answer changed at end of stream"),
                other => panic!("done before the end of the stream but not at it: {other:?}"),
            }
        }
    }
    if let Some((head_len, body_at)) = fetch::head_end(data) {
        assert!(head_len < body_at && body_at <= data.len());
        if let Ok((code, _, headers)) = fetch::parse_head(&data[..head_len]) {
            assert!((100..600).contains(&code));
            let _ = fetch::body_length(code, &headers);
        }
    }
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(u) = Url::parse(s) {
        assert!(u.path.starts_with('/'));
        let _ = fetch::request_text(&u);
        for loc in ["/abs?q", "rel/x", "../up", "//other:81/p", "http://h/"] {
            let _ = u.join(loc);
        }
    }
    let base = Url::parse("http://10.0.2.2:8080/kiln/stable/index.yaml").expect("a fixed URL");
    if let Ok(j) = base.join(s) {
        assert!(j.path.starts_with('/'));
    }
}

/// The CA the TLS target's client trusts, made once with openssl (P-256,
/// valid to 2126); the seeds' server certificate (CN kiln.test) is signed by
/// it. Its key is not kept: no test needs a new certificate.
const TLS_CA_PEM: &str = "-----BEGIN CERTIFICATE-----
MIIBlTCCATugAwIBAgIUJMiI4kg8pcogCjsdKhagdiZMLfQwCgYIKoZIzj0EAwIw
FzEVMBMGA1UEAwwMa2lsbiBmdXp6IENBMCAXDTI2MTIwNzIxMDk1NVoYDzIxMjYx
MTEzMjEwOTU1WjAXMRUwEwYDVQQDDAxraWxuIGZ1enogQ0EwWTATBgcqhkjOPQIB
BggqhkjOPQMBBwNCAARHKoWmJHRAPxvg7eb6ZgDrm7cVxnvIZX6ApYxrOrRyrlMx
miEAOKegHztSY+JpuX/RRjxJvCaPBJvh8bak+Y+wo2MwYTAdBgNVHQ4EFgQUrB22
JkXk532XxpHJCg01ED+6I44wHwYDVR0jBBgwFoAUrB22JkXk532XxpHJCg01ED+6
I44wDwYDVR0TAQH/BAUwAwEB/zAOBgNVHQ8BAf8EBAMCAQYwCgYIKoZIzj0EAwID
SAAwRQIhANRD77d5FybcArg6u/OUXtxp/9HKRVvkO4JzcQT9H5goAiBktMtBUvmT
+Kz7lMGEebzNHUZ1wX1d4M4J+qpU3tJK6w==
-----END CERTIFICATE-----
";

/// The TLS target's randomness: fixed, so the ClientHello's random and
/// session id are the same every run and a server's answer recorded once
/// (the seeds) is still an answer to it. Key shares stay random (ring draws
/// them itself); nothing the fuzzer sends can get past them anyway.
#[derive(Debug)]
struct FixedRandom;

impl rustls::crypto::SecureRandom for FixedRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
        buf.fill(0x6b);
        Ok(())
    }
}

/// The client config of the TLS target: the node's own
/// ([`tls::client_config_with`], as [`tls::client_config`] makes it for the
/// image's anchors), with [`FixedRandom`] in ring's provider and only
/// [`TLS_CA_PEM`] as a root.
pub fn tls_client_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    static RANDOM: FixedRandom = FixedRandom;
    CONFIG
        .get_or_init(|| {
            let ca = CertificateDer::from_pem_slice(TLS_CA_PEM.as_bytes()).expect("the fuzz CA is a PEM certificate");
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca).expect("the fuzz CA is a certificate");
            let provider = rustls::crypto::CryptoProvider { secure_random: &RANDOM, ..rustls::crypto::ring::default_provider() };
            tls::client_config_with(provider, roots)
        })
        .clone()
}

/// A client connection to `kiln.test` and the ClientHello it sends (for
/// recording a server's answer to seed the corpus).
pub fn tls_client() -> (rustls::ClientConnection, Vec<u8>) {
    let name = rustls::pki_types::ServerName::try_from("kiln.test").expect("a DNS name");
    let mut conn = rustls::ClientConnection::new(tls_client_config(), name).expect("a client connection");
    let mut hello = Vec::new();
    while conn.wants_write() {
        if conn.write_tls(&mut hello).is_err() {
            break;
        }
    }
    (conn, hello)
}

/// TLS records from a server, as kiln-init's client sees them after its
/// ClientHello. The first byte sets how the rest is cut before it is handed
/// to rustls (0: all at once; n: pieces of 8n bytes), so records arrive
/// whole, split and coalesced.
pub fn tls(data: &[u8]) {
    let Some((&cut, mut rest)) = data.split_first() else { return };
    let (mut conn, mut sink) = tls_client();
    let piece_len = if cut == 0 { usize::MAX } else { usize::from(cut) * 8 };
    'stream: while !rest.is_empty() {
        let (mut piece, tail) = rest.split_at(piece_len.min(rest.len()));
        rest = tail;
        while !piece.is_empty() {
            match conn.read_tls(&mut piece) {
                Ok(0) | Err(_) => break 'stream,
                Ok(_) => {}
            }
            if conn.process_new_packets().is_err() {
                // What the client answers (an alert) is written too.
                let _ = conn.write_tls(&mut sink);
                break 'stream;
            }
        }
        sink.clear();
        while conn.wants_write() {
            if conn.write_tls(&mut sink).is_err() {
                break;
            }
        }
    }
    let mut buf = [0u8; 4096];
    let _ = conn.reader().read(&mut buf);
    let _ = conn.is_handshaking();
    let _ = conn.peer_certificates();
    let _ = conn.writer().write(b"GET / HTTP/1.1\r\nHost: kiln.test\r\n\r\n");
    conn.send_close_notify();
    let _ = conn.write_tls(&mut sink);
}

// ---------------------------------------------------------------------------
// The update channel and bundles

/// The update channel's index.yaml.
pub fn index_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(mut index) = channel::parse_index(text) else { return };
    assert!(update::Version::parse(&index.version).is_ok(), "an index whose version does not parse");
    for arch in ["amd64", "arm64", "armv7"] {
        if let Ok(o) = index.for_arch(arch) {
            let _ = channel::newer(&o.version, "1.4.2");
        }
    }
    let _ = index.resolve("http://10.0.2.2:8080/kiln/stable/index.yaml");
}

/// The public key the bundle target's bundles are checked with (a key made
/// once with `minisign -G -W`; its secret half is not kept).
const BUNDLE_KEY: &str = "untrusted comment: minisign public key CAA577B400BF37F3
RWTzN78AtHelyjYFpSdysW/J1au1dBFV8JFB/Fk9JnPVcjPkIAyN3ZL5
";

/// A manifest signed with [`BUNDLE_KEY`] (`minisign -S -t "kiln fuzz
/// bundle"`): root.squashfs is bytes `(i * 7) as u8` for i in 0..600,
/// root.verity 512 bytes 0x5a, kiln.efi empty.
const BUNDLE_MANIFEST: &str = r#"format = 1
version = "1.2.3"
arch = "amd64"
profile = "fuzz"
roothash = "abababababababababababababababababababababababababababababababab"
source_date_epoch = 1700000000

[[part]]
name = "root.squashfs"
kind = "root"
size = 600
sha256 = "7eeb62713d060ab831056f9e3a27c74a053dc32830bc468eba9fe3a062567233"

[[part]]
name = "root.verity"
kind = "verity"
size = 512
sha256 = "a863e21577e54cd763729803a621804da4b5030afa35bcf879ea3b3413488a66"

[[part]]
name = "kiln.efi"
kind = "uki"
size = 0
sha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
"#;

const BUNDLE_MANIFEST_SIG: &str = "untrusted comment: signature from minisign secret key
RUTzN78AtHelyn92rZtm7nEb4L59cGns82XDBhdjKH94zKumnctj2DX6ZiOPp+GUn3otrN93crvirCHBrfUXb621QFx/agUkBQQ=
trusted comment: kiln fuzz bundle
4zELzo0U2bJ1dAThhmu2x65pDccoFQNJwlv/ZP7LHItbubIkRB0xlUcwpreAlq6TwZdY/fnfLDrZU7WCl+DODw==
";

/// The start of a bundle whose manifest's signature is valid: the
/// manifest and signature entries of [`BUNDLE_MANIFEST`].
pub fn signed_bundle_head() -> &'static [u8] {
    static HEAD: OnceLock<Vec<u8>> = OnceLock::new();
    HEAD.get_or_init(|| {
        let mut b = Vec::new();
        ustar_entry(&mut b, update::bundle::MANIFEST_NAME, BUNDLE_MANIFEST.as_bytes());
        ustar_entry(&mut b, update::bundle::SIGNATURE_NAME, BUNDLE_MANIFEST_SIG.as_bytes());
        b
    })
}

fn bundle_keys() -> &'static [PublicKey] {
    static KEYS: OnceLock<Vec<PublicKey>> = OnceLock::new();
    KEYS.get_or_init(|| vec![PublicKey::from_file(BUNDLE_KEY).expect("the fuzz bundle key")])
}

/// Opens a bundle and reads every part to its end, then the archive's end.
fn read_bundle(bytes: &[u8]) {
    let policy = Policy { keys: bundle_keys(), arch: "amd64", profile: "fuzz", running_version: Some("1.2.0"), allow_downgrade: false };
    let Ok(mut r) = BundleReader::open(Cursor::new(bytes), &policy) else { return };
    let least = r.expected_len();
    let _ = r.trusted_comment();
    let parts = r.manifest().parts.len();
    let mut read = 0;
    loop {
        match r.next_part() {
            Ok(Some(mut p)) => {
                let size = p.part().size;
                match io::copy(&mut p, &mut io::sink()) {
                    Ok(n) => assert_eq!(n, size, "a part read to its end has another size than its manifest's"),
                    Err(_) => return,
                }
                read += 1;
            }
            Ok(None) => break,
            Err(_) => return,
        }
    }
    assert_eq!(read, parts);
    if r.finish().is_ok() {
        assert!(bytes.len() as u64 >= least, "a complete bundle shorter than expected_len");
    }
}

/// An update bundle (before and after its signature is checked), the
/// manifest alone, and the install image's header.
///
/// The bytes are read as a whole bundle (the signature check stops most),
/// and again after the manifest and signature of [`BUNDLE_MANIFEST`], so
/// the parts' framing behind a valid signature is fuzzed too.
pub fn bundle(data: &[u8]) {
    read_bundle(data);
    let mut signed = signed_bundle_head().to_vec();
    signed.extend_from_slice(data);
    read_bundle(&signed);
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(m) = update::Manifest::parse(text) {
            let again = m.to_toml().expect("a parsed manifest serialises");
            assert_eq!(update::Manifest::parse(&again).ok(), Some(m), "manifest → toml → manifest changed it");
        }
    }
    install_image_header(data);
}

fn install_image_header(data: &[u8]) {
    let check = |img: &[u8]| {
        let mut cur = Cursor::new(img);
        if let Ok(h) = install_image::Header::decode(&mut cur) {
            assert_eq!(cur.position(), h.packed_start(), "decode stopped elsewhere than the packed area");
            let enc = h.encode().expect("a decoded header encodes");
            assert_eq!(enc[..], img[..enc.len()], "decode → encode changed the header");
            let _ = (h.root_bytes(), h.verity_bytes(), h.image_bytes());
            for r in &h.runs {
                let _ = h.is_table_run(r);
            }
        }
    };
    check(data);
    // Again with a correct header digest (and the zero padding, when the
    // bytes stop short of it), so the checks behind the digest run.
    let Some(n) = data.get(12..16).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize) else { return };
    let table_end = 32 + 64 * n;
    if n > 4096 || table_end > data.len() {
        return;
    }
    let packed_start = (table_end + 32).div_ceil(4096) * 4096;
    let mut img = data.to_vec();
    img.resize(img.len().max(packed_start), 0);
    let digest = sha256(&img[..table_end]);
    img[table_end..table_end + 32].copy_from_slice(&digest);
    check(&img);
}

// ---------------------------------------------------------------------------
// node.toml, minisign

/// node.toml, and each of its lines as a MAC, a CIDR and an NTP server.
pub fn node_toml(data: &[u8]) {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = config::parse(s) {
        if let Some(w) = &cfg.update.window {
            let _ = (w.start_minute(), w.day_numbers());
            for t in [0, 1_800_000_000, 4_102_444_800] {
                let until = w.seconds_until(t);
                assert!(until >= 0);
                assert_eq!(w.contains(t), until == 0);
            }
        }
        for i in &cfg.network.interfaces {
            let _ = i.wants_dhcp();
        }
    }
    let _ = config::line_of_key(s, "network.interfaces[0].mac");
    let _ = config::key_at_line(s, Some(2));
    assert!(config::line_at(s, s.len()) >= 1);
    for line in s.lines().take(32) {
        let v = line.trim();
        if let Some(m) = config::parse_mac(v) {
            let text = m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
            assert_eq!(config::parse_mac(&text), Some(m));
        }
        if let Ok((addr, prefix)) = config::parse_cidr(v) {
            assert!(prefix <= if addr.is_ipv4() { 32 } else { 128 });
            assert_eq!(config::parse_cidr(&format!("{addr}/{prefix}")), Ok((addr, prefix)));
        }
        if let Ok(n) = config::parse_ntp_server(v) {
            let shown = n.to_string();
            let again = config::parse_ntp_server(&shown).unwrap_or_else(|e| panic!("{v:?} → {shown:?} does not parse again: {e}"));
            assert_eq!(again.to_string(), shown);
            assert_eq!(again.port, n.port);
        }
        let _ = config::check_hostname(v);
    }
}

/// minisign public keys and signatures. Bytes before a NUL are the signed
/// data (else minisign's own test vector's data), the rest the `.minisig`
/// (or key) text, checked against the test vector's key.
pub fn minisign(data: &[u8]) {
    static KEY: OnceLock<PublicKey> = OnceLock::new();
    let key = KEY.get_or_init(|| PublicKey::from_file(vectors::VEC_PUB).expect("minisign's test key"));
    assert_eq!(minisign::b64_decode(&minisign::b64_encode(data)).as_deref(), Ok(data));
    let (signed, text) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (vectors::VEC_DATA, data),
    };
    let Ok(text) = std::str::from_utf8(text) else { return };
    if let Ok(comment) = key.verify(signed, text) {
        assert!(!comment.contains('\n'));
    }
    let _ = bundle_keys()[0].verify(signed, text);
    if let Ok(k) = PublicKey::from_file(text) {
        assert_eq!(PublicKey::from_file(&k.to_file()).ok().as_ref(), Some(&k), "key file round trip");
        assert_eq!(PublicKey::from_file(&k.to_base64()).ok().as_ref(), Some(&k), "bare key round trip");
        let _ = k.verify(vectors::VEC_DATA, vectors::VEC_SIG);
    }
    let lines = minisign::file_lines(text);
    for (i, l) in lines.iter().enumerate().take(8) {
        for len in [minisign::PUBLIC_KEY_LEN, minisign::SIGNATURE_LEN, 64] {
            let _ = minisign::decode_line("fuzz", &lines, i + 1, len);
        }
        if let Ok(raw) = minisign::b64_decode(l) {
            assert_eq!(&minisign::b64_encode(&raw), l, "accepted base64 that is not canonical");
        }
    }
    let _ = minisign::expect_untrusted_comment("fuzz", &lines, 1);
}

// ---------------------------------------------------------------------------
// Disks

/// What kiln-init reads from the disks it is given: sector 0 (MBR, the
/// protective MBR), the GPT and what stage 1 does with it (growing the data
/// partition), the var disk's and config volume's probes, ext4 and
/// dm-verity superblocks.
///
/// The first byte picks the block size (bit 0: 4096, else 512) and how much
/// larger than the bytes the disk is (the rest, in 64 Ki blocks), so the
/// growth plans have room; the rest is the start of the disk. The GPT is
/// read as it is, and again with its two CRCs made right.
pub fn gpt_mbr(data: &[u8]) {
    let Some((&flags, disk)) = data.split_first() else { return };
    let lba: usize = if flags & 1 != 0 { 4096 } else { 512 };
    let disk_lbas = (disk.len() / lba) as u64 + (u64::from(flags >> 1) << 16);
    let sector0 = &disk[..disk.len().min(512)];

    let _ = gpt::mbr_signature(sector0);
    for n in 0..=5 {
        for sectors in [disk_lbas * (lba as u64 / 512), u64::from(u32::MAX) + 7] {
            if let Some(p) = grow::mbr_plan(sector0, n, sectors) {
                assert!(p.new_sectors > p.old_sectors && p.entry.len() == 16);
                assert!(p.start + p.new_sectors <= sectors.min(u64::from(u32::MAX)));
            }
        }
    }

    let header = disk.get(lba..).map(|h| &h[..h.len().min(lba)]).unwrap_or(&[]);
    let entries = disk.get(2 * lba..).unwrap_or(&[]);
    let _ = gpt::Header::parse(header);
    let raw = gpt::Gpt::parse(lba as u64, header, entries).ok();
    let fixed = fix_gpt_crcs(header, entries).and_then(|h| gpt::Gpt::parse(lba as u64, &h, entries).ok());
    for g in [&raw, &fixed].into_iter().flatten() {
        use_gpt(g, sector0, disk, disk_lbas);
    }
    let _ = vardisk::classify(disk, None);

    let _ = volume::probe(&|off, buf: &mut [u8]| {
        let src = usize::try_from(off).ok().and_then(|o| disk.get(o..)?.get(..buf.len()));
        match src {
            Some(s) => {
                buf.copy_from_slice(s);
                Ok(())
            }
            None => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    });
    if let Some(sb) = disk.get(1024..2048).and_then(grow::Ext4Super::parse) {
        assert!(sb.block_size.is_power_of_two() && (1024..=65536).contains(&sb.block_size));
        let _ = sb.bytes();
    }
    for at in [0, lba] {
        if let Some(sb) = disk.get(at..).and_then(|b| VeritySuperblock::parse(b).ok()) {
            assert!(sb.hash_bytes() >= u64::from(sb.hash_block_size));
            let _ = (sb.data_bytes(), sb.salt_hex());
        }
    }
}

/// The header sector with its entries CRC and header CRC recomputed, when
/// its sizes allow.
fn fix_gpt_crcs(header: &[u8], entries: &[u8]) -> Option<Vec<u8>> {
    let mut h = header.to_vec();
    if h.len() < 512 {
        return None;
    }
    let u32_at = |h: &[u8], o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let n = u32_at(&h, 80) as u64 * u32_at(&h, 84) as u64;
    if let Some(e) = usize::try_from(n).ok().filter(|&n| n <= 1 << 20).and_then(|n| entries.get(..n)) {
        h[88..92].copy_from_slice(&crc32(e).to_le_bytes());
    }
    let size = u32_at(&h, 12) as usize;
    if !(92..=h.len()).contains(&size) {
        return None;
    }
    h[16..20].fill(0);
    let crc = crc32(&h[..size]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    Some(h)
}

fn use_gpt(g: &gpt::Gpt, sector0: &[u8], disk: &[u8], disk_lbas: u64) {
    let parts = g.partitions();
    for p in &parts {
        assert!(p.number >= 1 && p.number <= g.header.entry_count);
    }
    let _ = g.by_name("data");
    let _ = g.entry_lbas();
    let _ = vardisk::classify(disk, Some(g));
    for name in ["data", "kiln-var"] {
        let Ok(Some(plan)) = grow::Plan::new(g, name, disk_lbas) else { continue };
        assert!(plan.new_last > plan.old_last && plan.new_last < disk_lbas);
        let _ = (plan.old_bytes(), plan.new_bytes());
        let writes = plan.writes(g, Some(sector0));
        assert!(writes.len() >= 4);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The signed manifest and its key agree, so the bundle target reaches
    /// the parts: a bundle with the parts the manifest describes is whole.
    #[test]
    fn the_signed_bundle_head_opens() {
        let root: Vec<u8> = (0..600u32).map(|i| (i * 7) as u8).collect();
        let mut b = signed_bundle_head().to_vec();
        ustar_entry(&mut b, "root.squashfs", &root);
        ustar_entry(&mut b, "root.verity", &[0x5a; 512]);
        ustar_entry(&mut b, "kiln.efi", b"");
        b.extend_from_slice(&[0; 1024]);
        let policy = Policy { keys: bundle_keys(), arch: "amd64", profile: "fuzz", running_version: Some("1.2.0"), allow_downgrade: false };
        let mut r = BundleReader::open(Cursor::new(&b), &policy).unwrap();
        assert_eq!(r.trusted_comment(), "kiln fuzz bundle");
        while let Some(mut p) = r.next_part().unwrap() {
            io::copy(&mut p, &mut io::sink()).unwrap();
        }
        r.finish().unwrap();
        bundle(&b);
    }

    #[test]
    fn the_tls_client_says_hello() {
        let (_, hello) = tls_client();
        assert_eq!(hello[0], 0x16, "a handshake record");
        tls(&[0]);
    }
}
