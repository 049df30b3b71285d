//! The TLS tests' shared parts (`tests/tls.rs`, `tests/tls_edges.rs`, `tests/nginx.rs`): a test
//! CA and a server certificate for `localhost` and 127.0.0.1 made with the `openssl` CLI in a
//! temporary folder (no key is committed), rustls clients trusting that CA, and the `wsloop`
//! binary as a child with TLS on.

use crate::attack_support::{connect, upgrade_request, Metrics, Opts, Wsloop};
use crate::child_support::{self, run_bounded, TempDir};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use wsloop::TlsConfig;

/// Bound on one run of a command-line tool.
pub const TOOL_BOUND: Duration = Duration::from_secs(30);
const OPENSSL_INSTALL: &str = "apt-get install -y openssl";

// ---------------------------------------------------------------------------------------------
// Certificates

/// The test PKI, made with the openssl CLI in a temporary folder.
pub struct Certs {
    pub dir: TempDir,
    /// The test CA's certificate.
    pub ca: PathBuf,
    /// The server's certificate (CN and SAN localhost, SAN 127.0.0.1), signed by the CA, and
    /// its key.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A key that belongs to no certificate here.
    pub other_key: PathBuf,
    /// A certificate for localhost whose validity ended on 2020-01-02 (self-signed with
    /// `key`).
    pub expired: PathBuf,
}

/// openssl's arguments for a new P-256 key, unencrypted.
pub const EC: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

/// Run openssl with `args` in `dir`; panics with its output if it fails.
pub fn openssl(dir: &Path, args: &[&str]) {
    let run = run_bounded(
        Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null()),
        TOOL_BOUND,
    )
    .expect("run openssl");
    assert!(
        run.status.is_some_and(|s| s.success()),
        "openssl {args:?} failed:\n{}\n{}",
        run.stdout,
        run.stderr
    );
}

/// The test PKI, or `None` (after a note; a failure under CI) without openssl.
pub fn certs() -> Option<Certs> {
    let probe = run_bounded(
        Command::new("openssl").arg("version").stdin(Stdio::null()),
        TOOL_BOUND,
    );
    match probe {
        Ok(run) if run.status.is_some_and(|s| s.success()) => {}
        Ok(run) => {
            child_support::missing("tls", "openssl", run.stderr.trim(), OPENSSL_INSTALL);
            return None;
        }
        Err(e) => {
            child_support::missing("tls", "openssl", &e.to_string(), OPENSSL_INSTALL);
            return None;
        }
    }
    let dir = TempDir::new("tls");
    let d = dir.path();
    openssl(
        d,
        &[
            &["req", "-x509"][..],
            &EC,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=wsloop test CA",
            ],
        ]
        .concat(),
    );
    issue(
        d,
        "localhost",
        "DNS:localhost,IP:127.0.0.1",
        "cert.pem",
        "key.pem",
    );
    openssl(
        d,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "other.key",
        ],
    );
    // An expired certificate: `openssl ca` takes a start and an end date.
    std::fs::write(d.join("index.txt"), "").unwrap();
    std::fs::write(d.join("serial"), "01\n").unwrap();
    std::fs::write(
        d.join("ca.cnf"),
        "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\nserial = serial\n\
         default_md = sha256\npolicy = p\n[p]\ncommonName = supplied\n",
    )
    .unwrap();
    openssl(
        d,
        &[
            "ca",
            "-batch",
            "-config",
            "ca.cnf",
            "-selfsign",
            "-keyfile",
            "key.pem",
            "-in",
            "server.csr",
            "-out",
            "expired.pem",
            "-startdate",
            "20200101000000Z",
            "-enddate",
            "20200102000000Z",
        ],
    );
    Some(Certs {
        ca: d.join("ca.pem"),
        cert: d.join("cert.pem"),
        key: d.join("key.pem"),
        other_key: d.join("other.key"),
        expired: d.join("expired.pem"),
        dir,
    })
}

/// In `d`, where the test CA is: a new key (`key`) and a certificate (`cert`) for the common
/// name `cn` and the subject alternative names `san`, signed by the CA (its request stays in
/// `server.csr`).
pub fn issue(d: &Path, cn: &str, san: &str, cert: &str, key: &str) {
    let subject = format!("/CN={cn}");
    openssl(
        d,
        &[
            &["req", "-new"][..],
            &EC,
            &["-keyout", key, "-out", "server.csr", "-subj", &subject],
        ]
        .concat(),
    );
    std::fs::write(
        d.join("server.ext"),
        format!(
            "subjectAltName={san}\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        ),
    )
    .unwrap();
    openssl(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            cert,
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

impl Certs {
    pub fn tls(&self) -> TlsConfig {
        TlsConfig::new(&self.cert, &self.key)
    }

    /// `--tls-cert` and `--tls-key` for the binary.
    pub fn args(&self) -> [String; 4] {
        [
            "--tls-cert".into(),
            self.cert.display().to_string(),
            "--tls-key".into(),
            self.key.display().to_string(),
        ]
    }
}

// ---------------------------------------------------------------------------------------------
// A rustls client

pub type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A client configuration trusting the test CA, offering ALPN http/1.1, with `versions`.
pub fn client_config(
    certs: &Certs,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&certs.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)] // ring's provider, as the server's (src/io/tls.rs)
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection to `addr` (TLS 1.3 or 1.2), handshake completed.
pub fn tls_connect(addr: SocketAddr, certs: &Certs) -> Tls {
    tls_over(
        connect(addr, &Opts::default()).expect("connect"),
        certs,
        rustls::DEFAULT_VERSIONS,
    )
}

pub fn tls_over(
    tcp: TcpStream,
    certs: &Certs,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Tls {
    tls_named(tcp, certs, versions, "localhost")
}

/// A TLS connection over `tcp` to the server `name` (a DNS name, sent as SNI; or an IP
/// address: no SNI), its certificate verified for that name, handshake completed.
pub fn tls_named(
    tcp: TcpStream,
    certs: &Certs,
    versions: &[&'static rustls::SupportedProtocolVersion],
    name: &str,
) -> Tls {
    let name = ServerName::try_from(name.to_string()).unwrap();
    let conn = ClientConnection::new(client_config(certs, versions), name).unwrap();
    let mut s = StreamOwned::new(conn, tcp);
    finish_handshake(&mut s);
    s
}

/// tungstenite over rustls.
pub fn wss(addr: SocketAddr, certs: &Certs) -> tungstenite::WebSocket<Tls> {
    ws_over(tls_connect(addr, certs), addr)
}

/// tungstenite over a TLS stream whose handshake completed (its upgrade names `addr`'s port).
pub fn ws_over(s: Tls, addr: SocketAddr) -> tungstenite::WebSocket<Tls> {
    let config = tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    tungstenite::client::client_with_config(
        format!("wss://localhost:{}/", addr.port()),
        s,
        Some(config),
    )
    .unwrap_or_else(|e| panic!("upgrade over TLS failed: {e}"))
    .0
}

/// A TLS client (of `versions`) over `tcp` whose first bytes are `before` (cleartext: a PROXY
/// header, say) followed, in the same write, by its ClientHello; the handshake not driven
/// further.
pub fn hello_after(
    tcp: TcpStream,
    certs: &Certs,
    versions: &[&'static rustls::SupportedProtocolVersion],
    before: &[u8],
) -> Tls {
    let name = ServerName::try_from("localhost").unwrap();
    let config = client_config(certs, versions);
    let mut conn = ClientConnection::new(config, name).unwrap();
    let mut first = before.to_vec();
    while conn.wants_write() {
        conn.write_tls(&mut first).unwrap();
    }
    let mut s = StreamOwned::new(conn, tcp);
    s.sock.write_all(&first).unwrap();
    s
}

/// Drive a client's handshake to its end (bounded by the socket's timeouts).
pub fn finish_handshake(s: &mut Tls) {
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .unwrap_or_else(|e| panic!("TLS handshake: {e}"));
    }
}

/// Read (bounded by the socket's timeout) until the TLS stream ends: `Ok(bytes)` at a clean end
/// (the server's `close_notify`), `Err(kind)` otherwise (`UnexpectedEof`: TCP's FIN without
/// it).
pub fn read_to_tls_end(s: &mut Tls) -> Result<Vec<u8>, ErrorKind> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return Ok(got),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e.kind()),
        }
    }
}

/// A WebSocket upgrade over TLS by hand; the response head.
pub fn upgrade_over(s: &mut Tls, addr: SocketAddr) -> String {
    s.write_all(&upgrade_request(addr)).unwrap();
    s.flush().unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(s.read(&mut b).unwrap(), 1, "EOF in the response head");
        head.push(b[0]);
    }
    String::from_utf8(head).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Attacks on the binary, each ending at the exact descriptor baseline

/// The binary with TLS, `--handshake-timeout 1`, metrics on a plain address of their own.
pub fn tls_child(certs: &Certs, name: &str, more: &[&str]) -> Wsloop {
    let tls = certs.args();
    let mut args: Vec<&str> = tls.iter().map(String::as_str).collect();
    args.extend([
        "--metrics-listen",
        "127.0.0.1:0",
        "--handshake-timeout",
        "1",
    ]);
    args.extend(more);
    Wsloop::spawn_with_fd_limit(name, 512, &args)
}

/// [`tls_child`], once its descriptor count is at its baseline; its metrics then.
pub fn tls_child_at_baseline(certs: &Certs, name: &str, more: &[&str]) -> (Wsloop, Metrics) {
    let w = tls_child(certs, name, more);
    let m0 = w.metrics();
    w.wait_baseline();
    (w, m0)
}

/// The end of an attack: the descriptor count back at its exact baseline, no connection held
/// and no timer armed, and an fd audit run since that finds no difference; the metrics then.
pub fn settled(w: &Wsloop) -> Metrics {
    w.wait_baseline();
    let m = w.wait_quiet();
    assert_eq!(w.audited(&m).get("wsloop_fd_audit_difference"), 0.0);
    m
}

pub fn handshakes(m: &Metrics, result: &str) -> u64 {
    m.get(&format!(
        "wsloop_tls_handshakes_total{{result=\"{result}\"}}"
    )) as u64
}

/// Read what the server sends until it closes (EOF or reset), bounded; the bytes and how long
/// it took from `since`.
pub fn until_closed(s: &mut TcpStream, since: Instant) -> (Vec<u8>, Duration) {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("not closed: {e} after {:?}", since.elapsed()),
        }
    }
    (got, since.elapsed())
}

/// A handler that accepts every upgrade and does nothing with messages.
pub struct Noop;

impl wsloop::Handler for Noop {
    type Data = ();
    fn upgrade(&mut self, _req: &wsloop::UpgradeRequest<'_>) -> wsloop::Decision<()> {
        wsloop::Decision::accept(())
    }
    fn on_message(&mut self, _ws: &mut wsloop::WebSocket<'_, ()>, _msg: wsloop::Message<'_>) {}
}
