//! Every limit and timeout of a [`Server`](crate::Server), with its documented default.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// The smallest `recv_buffer_size` with TLS: a record (up to 16 KiB of plaintext and 2 KiB of
/// expansion) is read and opened in place in the receive buffer, so a whole one must fit.
pub const TLS_MIN_RECV_BUFFER: usize = 32 * 1024;

/// The limits and timeouts a server enforces. `Config::default()` is what the `wsloop` binary
/// runs with unless told otherwise; the README's limits table lists the same values.
///
/// A zero duration disables the timeout it names, except where noted. The loop keeps time in
/// whole milliseconds (its timer wheel's tick): a duration between zero and one millisecond is
/// refused, and one with a fraction of a millisecond is rounded up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Largest message (after reassembling fragments) accepted from a client, in bytes.
    /// Larger ones close the connection with 1009 as soon as a frame header announces them.
    /// Default 16 KiB (as uWebSockets).
    pub max_message_size: usize,
    /// Largest HTTP request head, in bytes; larger gets 431. Default 8 KiB.
    pub max_header_bytes: usize,
    /// Most header lines in the request head; more gets 431. Default 64, at most 128.
    pub max_headers: usize,
    /// Time from accept to a complete upgrade request. Absolute: bytes trickling in do not
    /// extend it. On expiry the client gets 408 and the connection is closed. Default 10 s;
    /// may not be zero.
    pub handshake_timeout: Duration,
    /// An open connection from which nothing arrives for this long is closed. Half-way through,
    /// the server sends a ping, which a live client answers. Default 120 s (as uWebSockets).
    pub idle_timeout: Duration,
    /// After the server sends a close frame, how long it waits for the client's close frame
    /// (and for its own unsent bytes to drain) before closing the TCP connection. Default 5 s;
    /// may not be zero.
    pub close_timeout: Duration,
    /// On graceful shutdown, how long to wait for clients to finish the close handshake before
    /// the remaining connections are dropped and the loop returns. Default 5 s.
    pub shutdown_timeout: Duration,
    /// Size of the one receive buffer the loop shares between all connections. Default 64 KiB;
    /// with TLS at least [`TLS_MIN_RECV_BUFFER`] (records are opened where they are read).
    pub recv_buffer_size: usize,
    /// The kernel send buffer of each connection (`SO_SNDBUF`, which the kernel doubles), or 0
    /// (the default) to leave it to the kernel's auto-tuning, which may grow it to
    /// `net.ipv4.tcp_wmem`'s maximum (4 MiB on many systems) for a client that reads slowly.
    /// Those bytes are kernel memory, outside `max_backpressure`: set this to bound what a
    /// connection can hold in the kernel, at the cost of throughput to distant clients.
    pub socket_send_buffer: usize,
    /// The kernel receive buffer of each connection (`SO_RCVBUF` on the listeners, which
    /// accepted connections inherit, so that the window they announce fits it; the kernel
    /// doubles it), or 0 (the default) to leave it to the kernel's auto-tuning, which may grow
    /// it to `net.ipv4.tcp_rmem`'s maximum (6 MiB on many systems). While the loop does not
    /// read a connection (its queue over `max_backpressure`, say) what the client sends waits
    /// there, in kernel memory outside the memory budget: set this to bound it.
    pub socket_receive_buffer: usize,
    /// How many readiness events one poll call can return. Default 1024.
    pub events_capacity: usize,
    /// Most connections held at once (handshaking, open or closing). Beyond it new connections
    /// are answered `503 Service Unavailable` with `Retry-After` and closed. 0 (the default)
    /// derives it from the fd budget: the soft `RLIMIT_NOFILE`, minus the descriptors the process
    /// already has open when the server starts, minus `fd_headroom`, minus a reserve for
    /// answering refused clients. A value that does not fit the budget is a startup error.
    pub max_connections: usize,
    /// Most connections from one IP address. Beyond it: 503. 0 (the default) is unlimited,
    /// since clients behind one NAT or proxy share an address.
    pub max_connections_per_ip: u32,
    /// New connections per second from one IP address (token bucket). Beyond it:
    /// `429 Too Many Requests` with `Retry-After`. 0 (the default) is unlimited.
    pub connection_rate_per_ip: u32,
    /// The bucket size for `connection_rate_per_ip` (bursts). 0 means "equal to the rate".
    pub connection_burst_per_ip: u32,
    /// How many leading bits of an IPv6 client address make the "IP" of the per-IP limits:
    /// 64 (the default) counts a /64 as one client, since one subscriber usually holds a whole
    /// /64 and could otherwise take a fresh address for every connection; 128 counts each
    /// address. 1 to 128. IPv4 addresses always count one by one.
    pub ipv6_prefix_len: u8,
    /// Descriptors left for the rest of the process when deriving `max_connections`.
    /// Default 32; at most 2^30 (more than a Linux process can open).
    pub fd_headroom: usize,
    /// Raise the soft `RLIMIT_NOFILE` to the hard limit when the server starts (logged).
    /// Default true.
    pub raise_fd_limit: bool,
    /// The listen backlog, capped by the kernel's `net.core.somaxconn`. Default 1024.
    pub listen_backlog: u32,
    /// Most connections accepted from one listener in one loop turn; the rest wait for the next
    /// turn, so a connection storm cannot starve established connections. Default 256.
    pub accepts_per_turn: usize,
    /// Most bytes queued for a client that reads slower than the server sends. Every byte
    /// written to the connection counts: messages, pongs, pings, close frames, HTTP answers.
    /// A send made while more than this is queued is refused, and the connection closed (1008)
    /// or the message dropped, by `backpressure_policy`; while more than this is queued the
    /// connection is not read (so that its pings and messages cannot queue more), until the
    /// queue has drained to half of it. Default 64 KiB (as uWebSockets).
    pub max_backpressure: usize,
    /// What to do with a send over `max_backpressure`. Default `Close`.
    pub backpressure_policy: BackpressurePolicy,
    /// A connection with unsent bytes whose socket accepts none of them for this long is
    /// dropped; one with more than `max_backpressure` queued must bring its queue under half
    /// of that within this time, however much each write takes, or it is dropped too. Default
    /// 30 s.
    pub write_stall_timeout: Duration,
    /// Open connections are closed (1001) after this long, whatever they do. Default 0 (off).
    pub max_lifetime: Duration,
    /// Answer `GET /metrics` (Prometheus) and `GET /healthz` on the WebSocket listeners too.
    /// Default false: they tell strangers the server's limits and load, and a flood of them
    /// there would spend the endpoints' rate budget that health checks on the same port need
    /// (see `endpoint_rate`). [`Server::listen_metrics`](crate::Server::listen_metrics) serves
    /// them on an address of their own either way.
    pub serve_metrics: bool,
    /// Requests a second that `/metrics` and `/healthz` answer, the two together, per loop:
    /// one budget for the WebSocket listeners and one for the metrics listeners (so that a
    /// flood on the public port never starves the operators' address), each allowing bursts of
    /// the same size. Beyond it they answer `429 Too Many Requests` with `Retry-After: 1`.
    /// Every request costs a connection of its own (the answer closes it). Default 50; 0: no
    /// limit.
    pub endpoint_rate: u32,
    /// How often the loop compares `/proc/self/fd` with the descriptors it accounts for, and
    /// warns on a difference. Default 10 s; 0 turns the periodic audit off.
    pub audit_interval: Duration,
    /// Run every application callback under `catch_unwind`: a panic closes that connection
    /// (1011, or 500 before the upgrade), is counted and logged, and the loop goes on. Default
    /// true; false lets a panic unwind out of `run` (for applications that prefer to abort).
    pub catch_panics: bool,
    /// A loop turn running longer than this is reported by the stall watchdog thread (a
    /// warning naming the callback and connection, a counter, the longest stall). Default
    /// 100 ms; 0 runs no watchdog.
    pub stall_threshold: Duration,
    /// Origins allowed to open WebSockets (the browser's `Origin` header), against cross-site
    /// WebSocket hijacking: exact (`https://app.example.com`), any subdomain
    /// (`https://*.example.com`), or `null`. Others get 403. Empty (the default) allows any.
    pub allowed_origins: Vec<String>,
    /// With `allowed_origins` set, whether a request without `Origin` (non-browser clients) is
    /// allowed. Default true.
    pub allow_missing_origin: bool,
    /// Proxies whose word on the client address is taken (`10.0.0.5`, `10.0.0.0/8`, `::1`):
    /// for connections from them, the per-address limits and the upgrade hook's `peer_addr` use
    /// the client address from the PROXY header (with `proxy_protocol`) or else from
    /// `Forwarded` / `X-Forwarded-For`. Headers from other peers are ignored. Default empty.
    pub trusted_proxies: Vec<String>,
    /// Connections from trusted proxies start with a PROXY protocol header (v1 or v2, as
    /// HAProxy and nginx's stream module send it); a malformed one gets 400. Under TLS the
    /// header comes in cleartext before the ClientHello. Default false.
    pub proxy_protocol: bool,
    /// Which header the trusted proxies set (without `proxy_protocol`): only that one is read,
    /// since a proxy passes the other one on as the client wrote it. Default `XForwardedFor`
    /// (what nginx's `$proxy_add_x_forwarded_for` and HAProxy's `option forwardfor` set).
    pub forwarded_header: ForwardedHeader,
    /// Event loops to run, one per thread, each with its own listener on the same port
    /// (`SO_REUSEPORT`: the kernel spreads new connections over them), its own connections,
    /// timers and share of the fd budget and of `max_connections`. Read by
    /// [`Cluster`](crate::Cluster); a [`Server`](crate::Server) is one loop. Default 1 (no
    /// `SO_REUSEPORT`, so a second server on the same port fails to bind).
    pub threads: usize,
    /// Most commands a server's [`LoopHandle`](crate::LoopHandle)s may have queued for the
    /// loop at once (sends, closes, terminates, posted closures), counted until the loop has
    /// run them. Beyond it the handle refuses the command with
    /// [`QueueError::Full`](crate::QueueError::Full). Default 65536.
    pub handle_queue_commands: usize,
    /// Most bytes those commands may hold at once: each message's (or close reason's) buffer
    /// and each closure's own size, plus the command's fixed size (a few dozen bytes). Beyond
    /// it: [`QueueError::Full`](crate::QueueError::Full); a single command larger than this:
    /// [`QueueError::TooLarge`](crate::QueueError::TooLarge). Default 16 MiB.
    pub handle_queue_bytes: usize,
    /// The memory budget: the most bytes the loops may hold in buffers that grow with what
    /// clients send or do not read (partial messages and request heads, send queues, a turn's
    /// publications), over all loops (split evenly, as the fd budget is). Near it (15/16) the
    /// loops shed: new connections get 503, and a connection that grows its buffers past its
    /// share is closed (1013, or 503 before the upgrade); shedding stops at 12/16. 0 (the
    /// default): half the cgroup's memory limit, else a quarter of the machine's RAM (see
    /// [`crate::memory::default_budget`]).
    pub memory_budget: usize,
    /// Most topics one connection may be subscribed to at once; a subscription beyond it is
    /// refused with [`TopicError::TooMany`](crate::topics::TopicError::TooMany). Default 1024.
    pub max_topics_per_connection: usize,
    /// permessage-deflate (RFC 7692): which profile the server negotiates with clients that
    /// offer it. Default [`Compression::Off`] (the header is ignored, as uWebSockets does by
    /// default). See README, Compression.
    pub compression: Compression,
    /// With compression negotiated, messages shorter than this many bytes are sent
    /// uncompressed (RSV1 clear, which RFC 7692 allows per message): deflating a short message
    /// costs more time than it saves bytes. Default 1024 (as Node `ws`).
    pub compression_threshold: usize,
    /// [`Compression::Dedicated`]: the largest window the server compresses with, in bits
    /// (9 to 15; a client's `server_max_window_bits` may lower it). Default 15 (32 KiB).
    pub compression_window_bits: u8,
    /// [`Compression::Dedicated`]: zlib's memory level for each connection's compressor (1 to
    /// 9). Default 8. What a connection's state costs for each window and level is in README,
    /// Compression (from about 180 KiB to 530 KiB).
    pub compression_mem_level: u8,
    /// [`Compression::Dedicated`]: the most bytes all connections' own compression state may
    /// hold, over the whole process. A connection whose state would pass it is negotiated with
    /// the shared profile instead (counted as a downgrade). 0 (the default): a quarter of the
    /// memory budget.
    pub compression_budget: usize,
    /// Share topics with other instances through Redis pub/sub (see [`RedisConfig`]): `None`
    /// (the default) keeps topics within this process.
    pub redis: Option<RedisConfig>,
    /// TLS (wss://) on the WebSocket listeners, with this certificate and key (see
    /// [`TlsConfig`]); the metrics-only listener stays plain. `None` (the default): plain TCP.
    pub tls: Option<TlsConfig>,
    /// With TLS: the most TLS handshakes in progress at once, over all loops (split evenly,
    /// at least one per loop). A new connection on a TLS listener beyond it is closed at once,
    /// before any handshake work and without an answer, and counted
    /// (`wsloop_tls_handshakes_capped_total`), so that a flood of half-done handshakes holds
    /// no more than this many connections' TLS state. Default 1024; 0: no cap.
    pub tls_max_handshakes: usize,
}

/// TLS on the WebSocket listeners (rustls; TLS 1.2 and 1.3, ALPN `http/1.1`). The files are
/// read once when the server starts, and the configuration made from them is shared by every
/// loop of a [`Cluster`](crate::Cluster). A file that cannot be read, holds no certificate or
/// no key, a key that does not match the certificate, or a certificate past its `notAfter` is a
/// start-up error ([`ConfigError`] with the field `tls_cert` or `tls_key`, naming the file; or
/// `tls_sni`, also when an SNI certificate is not valid for its name).
///
/// The files can be read again while the server runs
/// ([`LoopHandle::reload_tls`](crate::LoopHandle::reload_tls); SIGHUP in the binary): new
/// handshakes use the new certificates, open connections keep theirs, and a wrong new file
/// leaves the old certificates in place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsConfig {
    /// The certificate chain, PEM: the server's certificate first, then the intermediates.
    /// The default certificate: served when the client names no server (SNI) or one that
    /// [`TlsConfig::sni`] does not list.
    pub cert_chain: PathBuf,
    /// The private key, PEM: PKCS#8 (`PRIVATE KEY`), PKCS#1 (`RSA PRIVATE KEY`) or SEC1
    /// (`EC PRIVATE KEY`).
    pub private_key: PathBuf,
    /// Certificates chosen by the server name the client asks for (SNI), each for one exact
    /// DNS name (matched without regard to case; no wildcards).
    pub sni: Vec<SniCertificate>,
}

/// A certificate served to clients that ask for one server name (SNI).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SniCertificate {
    /// The DNS name, which the certificate must be valid for.
    pub name: String,
    /// The certificate chain, PEM, as [`TlsConfig::cert_chain`].
    pub cert_chain: PathBuf,
    /// Its private key, PEM, as [`TlsConfig::private_key`].
    pub private_key: PathBuf,
}

impl TlsConfig {
    /// TLS with the certificate chain and the private key in these PEM files.
    pub fn new(cert_chain: impl Into<PathBuf>, private_key: impl Into<PathBuf>) -> Self {
        TlsConfig {
            cert_chain: cert_chain.into(),
            private_key: private_key.into(),
            sni: Vec::new(),
        }
    }

    /// Also serve this certificate chain and key to clients asking for the server `name`.
    pub fn with_sni(
        mut self,
        name: impl Into<String>,
        cert_chain: impl Into<PathBuf>,
        private_key: impl Into<PathBuf>,
    ) -> Self {
        self.sni.push(SniCertificate {
            name: name.into(),
            cert_chain: cert_chain.into(),
            private_key: private_key.into(),
        });
        self
    }
}

/// The Redis bridge: one per process, on threads of its own, sharing this process's topics with
/// every other instance connected to the same Redis (README, "Several instances (Redis)").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisConfig {
    /// Where Redis listens: `redis://HOST:PORT/` (`redis://:PASSWORD@HOST:PORT/` with a
    /// password). No TLS (`rediss://` is refused): run Redis on a trusted network.
    pub url: String,
    /// Prepended to every topic to make its Redis channel, so that several applications can
    /// share one Redis (default `wsloop:`; at most 64 bytes).
    pub prefix: String,
    /// The most publications waiting to be sent to Redis (default 65,536): beyond it, or beyond
    /// [`RedisConfig::queue_bytes`], the oldest are dropped and counted, so that a slow or
    /// absent Redis never makes the process grow.
    pub queue_messages: usize,
    /// The most bytes (topics and payloads) of the publications waiting to be sent to Redis
    /// (default 16 MiB).
    pub queue_bytes: usize,
    /// Sharded pub/sub (Redis 7; off by default): `SPUBLISH` and `SSUBSCRIBE` instead of
    /// `PUBLISH` and `SUBSCRIBE`. On a Redis Cluster (`url` names any of its nodes) the bridge
    /// connects to every primary, at most 16, and each topic's messages go through the primary
    /// that serves its channel's slot only; on a Redis without cluster mode it behaves as
    /// without sharding. The fd budget keeps 32 descriptors for the bridge instead of 2. See
    /// the README, "Several instances (Redis)".
    pub sharded: bool,
}

impl RedisConfig {
    /// The bridge to the Redis at `url`, with the default prefix and queue bounds.
    pub fn new(url: impl Into<String>) -> Self {
        RedisConfig {
            url: url.into(),
            ..RedisConfig::default()
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        RedisConfig {
            url: "redis://127.0.0.1:6379/".into(),
            prefix: "wsloop:".into(),
            queue_messages: 65_536,
            queue_bytes: 16 << 20,
            sharded: false,
        }
    }
}

/// The permessage-deflate profile the server negotiates (RFC 7692).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Compression {
    /// No compression: the extension is never negotiated, and `Sec-WebSocket-Extensions` is
    /// not read.
    #[default]
    Off,
    /// No context takeover in either direction (the 101 answers
    /// `server_no_context_takeover; client_no_context_takeover`): each message is compressed
    /// and inflated on its own, with one compressor and one decompressor per loop shared by
    /// every connection, so an idle connection holds no compression state.
    Shared,
    /// Context takeover both ways (unless the client asks for none): each connection its own
    /// compressor and decompressor ([`Config::compression_window_bits`],
    /// [`Config::compression_mem_level`]), which compress repetitive traffic better, within a
    /// process-wide budget ([`Config::compression_budget`]); past it, new connections get the
    /// shared profile.
    Dedicated,
}

/// The header a trusted proxy names the client in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, ...`
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239)
    Forwarded,
}

/// What a send over the backpressure limit does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackpressurePolicy {
    /// Refuse the send and close the connection with 1008 (the slow reader is cut off).
    Close,
    /// Refuse the send ([`SendStatus::Dropped`](crate::SendStatus::Dropped)) and keep the
    /// connection.
    Drop,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_message_size: 16 * 1024,
            max_header_bytes: 8 * 1024,
            max_headers: 64,
            handshake_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            close_timeout: Duration::from_secs(5),
            shutdown_timeout: Duration::from_secs(5),
            recv_buffer_size: 64 * 1024,
            socket_send_buffer: 0,
            socket_receive_buffer: 0,
            events_capacity: 1024,
            max_connections: 0,
            max_connections_per_ip: 0,
            connection_rate_per_ip: 0,
            connection_burst_per_ip: 0,
            ipv6_prefix_len: 64,
            fd_headroom: 32,
            raise_fd_limit: true,
            listen_backlog: 1024,
            accepts_per_turn: 256,
            max_backpressure: 64 * 1024,
            backpressure_policy: BackpressurePolicy::Close,
            write_stall_timeout: Duration::from_secs(30),
            max_lifetime: Duration::ZERO,
            serve_metrics: false,
            endpoint_rate: 50,
            audit_interval: Duration::from_secs(10),
            catch_panics: true,
            stall_threshold: Duration::from_millis(100),
            allowed_origins: Vec::new(),
            allow_missing_origin: true,
            trusted_proxies: Vec::new(),
            proxy_protocol: false,
            threads: 1,
            forwarded_header: ForwardedHeader::XForwardedFor,
            handle_queue_commands: 65_536,
            handle_queue_bytes: 16 << 20,
            max_topics_per_connection: 1024,
            memory_budget: 0,
            compression: Compression::Off,
            compression_threshold: 1024,
            compression_window_bits: 15,
            compression_mem_level: 8,
            compression_budget: 0,
            redis: None,
            tls: None,
            tls_max_handshakes: 1024,
        }
    }
}

/// A configuration value outside its allowed range, named with the reason. The `wsloop` binary
/// reports it with the flag that sets the field (`--max-message-size` for `max_message_size`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    /// The field at fault; or [`FD_LIMIT`] when it is the process's descriptor limit
    /// (`RLIMIT_NOFILE`) that is too low for the configuration.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {}: {}", self.field, self.reason)
    }
}

impl std::error::Error for ConfigError {}

/// The name [`ConfigError::field`] gives the process's descriptor limit (`RLIMIT_NOFILE`, the
/// binary's `--fd-limit`), which is no field of [`Config`].
pub const FD_LIMIT: &str = "fd_limit";

/// The ceiling for `fd_headroom`: more descriptors than a Linux process can have
/// (`fs.nr_open` is at most about 2^30).
pub const MAX_FD_HEADROOM: usize = 1 << 30;

/// The ceiling for `max_headers`: the handshake parser keeps the headers in a stack array of
/// this many entries.
pub const MAX_HEADERS_CAP: usize = 128;

impl Config {
    /// Check every value; the first one out of range is reported. Servers refuse to start with
    /// an invalid configuration.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn err(field: &'static str, reason: impl Into<String>) -> Result<(), ConfigError> {
            Err(ConfigError {
                field,
                reason: reason.into(),
            })
        }
        if self.max_message_size == 0 {
            return err("max_message_size", "must be at least 1 byte");
        }
        if self.max_message_size > (1 << 40) {
            return err("max_message_size", "must be at most 1 TiB");
        }
        if self.max_header_bytes < 64 || self.max_header_bytes > 1 << 20 {
            return err("max_header_bytes", "must be between 64 bytes and 1 MiB");
        }
        if self.max_headers == 0 || self.max_headers > MAX_HEADERS_CAP {
            return err(
                "max_headers",
                format!("must be between 1 and {MAX_HEADERS_CAP}"),
            );
        }
        if self.handshake_timeout.is_zero() {
            return err("handshake_timeout", "may not be zero");
        }
        if self.close_timeout.is_zero() {
            return err("close_timeout", "may not be zero");
        }
        let year = Duration::from_secs(86_400 * 365);
        for (field, d) in [
            ("write_stall_timeout", self.write_stall_timeout),
            ("max_lifetime", self.max_lifetime),
            ("audit_interval", self.audit_interval),
            ("stall_threshold", self.stall_threshold),
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("close_timeout", self.close_timeout),
            ("shutdown_timeout", self.shutdown_timeout),
        ] {
            if d > year {
                return err(field, "must be at most a year");
            }
        }
        // The timer wheel ticks in milliseconds: a shorter timeout would read as zero (off, or
        // at once). The stall watchdog measures in nanoseconds, so its threshold may be shorter.
        for (field, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("close_timeout", self.close_timeout),
            ("write_stall_timeout", self.write_stall_timeout),
            ("max_lifetime", self.max_lifetime),
            ("shutdown_timeout", self.shutdown_timeout),
            ("audit_interval", self.audit_interval),
        ] {
            if !d.is_zero() && d < Duration::from_millis(1) {
                return err(
                    field,
                    format!(
                        "{d:?} is shorter than the timer's 1 ms tick: use 0 (off) or at least 1 ms"
                    ),
                );
            }
        }
        if self.recv_buffer_size < 1024 || self.recv_buffer_size > 64 << 20 {
            return err("recv_buffer_size", "must be between 1 KiB and 64 MiB");
        }
        if self.events_capacity == 0 || self.events_capacity > 1 << 20 {
            return err("events_capacity", "must be between 1 and 1048576");
        }
        if self.listen_backlog == 0 || self.listen_backlog > 1 << 20 {
            return err("listen_backlog", "must be between 1 and 1048576");
        }
        if self.accepts_per_turn == 0 {
            return err("accepts_per_turn", "must be at least 1");
        }
        if self.socket_send_buffer != 0 && !(4096..=256 << 20).contains(&self.socket_send_buffer) {
            return err(
                "socket_send_buffer",
                "must be 0 (the kernel's) or 4 KiB to 256 MiB",
            );
        }
        if self.socket_receive_buffer != 0
            && !(4096..=256 << 20).contains(&self.socket_receive_buffer)
        {
            return err(
                "socket_receive_buffer",
                "must be 0 (the kernel's) or 4 KiB to 256 MiB",
            );
        }
        if !(1..=128).contains(&self.ipv6_prefix_len) {
            return err("ipv6_prefix_len", "must be 1 to 128 bits");
        }
        if self.max_backpressure == 0 {
            return err("max_backpressure", "must be at least 1 byte");
        }
        if self.write_stall_timeout.is_zero() {
            return err("write_stall_timeout", "may not be zero");
        }
        if self.threads == 0 || self.threads > 256 {
            return err("threads", "must be between 1 and 256");
        }
        if self.max_connections > 0 && self.max_connections < self.threads {
            return err(
                "max_connections",
                "must be 0 (derived) or at least one per thread",
            );
        }
        if self.max_connections > 1 << 24 {
            return err("max_connections", "must be at most 16777216");
        }
        if self.fd_headroom > MAX_FD_HEADROOM {
            return err(
                "fd_headroom",
                format!(
                    "{} is more descriptors than a process can have: must be at most {MAX_FD_HEADROOM}",
                    self.fd_headroom
                ),
            );
        }
        if self.handle_queue_commands == 0 || self.handle_queue_commands > 1 << 24 {
            return err("handle_queue_commands", "must be between 1 and 16777216");
        }
        if self.handle_queue_bytes < 4096 || self.handle_queue_bytes > 1 << 40 {
            return err("handle_queue_bytes", "must be between 4 KiB and 1 TiB");
        }
        if self.memory_budget != 0 && self.memory_budget < 1 << 20 {
            return err("memory_budget", "must be 0 (derived) or at least 1 MiB");
        }
        if !(9..=15).contains(&self.compression_window_bits) {
            return err("compression_window_bits", "must be 9 to 15");
        }
        if !(1..=9).contains(&self.compression_mem_level) {
            return err("compression_mem_level", "must be 1 to 9");
        }
        if self.max_topics_per_connection == 0 || self.max_topics_per_connection > 1 << 20 {
            return err("max_topics_per_connection", "must be between 1 and 1048576");
        }
        if let Some(r) = &self.redis {
            if !r.url.starts_with("redis://") {
                return err(
                    "redis",
                    "the URL must start with redis:// (no TLS, no sockets)",
                );
            }
            if let Err(e) = redis::Client::open(r.url.as_str()) {
                return err("redis", format!("{:?} is not a Redis URL: {e}", r.url));
            }
            if r.prefix.len() > 64 {
                return err("redis_prefix", "must be at most 64 bytes");
            }
            if r.queue_messages == 0 || r.queue_messages > 1 << 24 {
                return err("redis_queue_messages", "must be between 1 and 16777216");
            }
            if r.queue_bytes < 4096 || r.queue_bytes > 1 << 40 {
                return err("redis_queue_bytes", "must be between 4 KiB and 1 TiB");
            }
        }
        if let Err(e) = crate::origin::OriginPolicy::new(&self.allowed_origins, true) {
            return err("allowed_origins", e);
        }
        if let Err(e) = crate::admission::TrustedProxies::parse(&self.trusted_proxies) {
            return err("trusted_proxies", e);
        }
        if self.tls_max_handshakes > 1 << 24 {
            return err("tls_max_handshakes", "must be at most 16777216 (0: no cap)");
        }
        if let Some(tls) = &self.tls {
            if self.recv_buffer_size < TLS_MIN_RECV_BUFFER {
                return err(
                    "recv_buffer_size",
                    "must be at least 32 KiB with TLS (a TLS record, up to 18 KiB, is opened where it is read)",
                );
            }
            if tls.cert_chain.as_os_str().is_empty() {
                return err("tls_cert", "names no file");
            }
            if tls.private_key.as_os_str().is_empty() {
                return err("tls_key", "names no file");
            }
            let mut names = std::collections::HashSet::new();
            for sni in &tls.sni {
                if sni.name.is_empty() {
                    return err("tls_sni", "a certificate for no name");
                }
                if sni.cert_chain.as_os_str().is_empty() || sni.private_key.as_os_str().is_empty() {
                    return err("tls_sni", format!("{}: names no file", sni.name));
                }
                if !names.insert(sni.name.to_ascii_lowercase()) {
                    return err("tls_sni", format!("{}: named twice", sni.name));
                }
            }
        }
        if self.proxy_protocol && self.trusted_proxies.is_empty() {
            return err(
                "proxy_protocol",
                "needs trusted_proxies: whose PROXY headers to accept",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let c = Config::default();
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.max_message_size, 16384);
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.idle_timeout, Duration::from_secs(120));
        assert_eq!(c.close_timeout, Duration::from_secs(5));
    }

    #[test]
    fn invalid_values_are_named() {
        let cases: Vec<(&str, Config)> = vec![
            (
                "max_message_size",
                Config {
                    max_message_size: 0,
                    ..Config::default()
                },
            ),
            (
                "max_header_bytes",
                Config {
                    max_header_bytes: 10,
                    ..Config::default()
                },
            ),
            (
                "socket_receive_buffer",
                Config {
                    socket_receive_buffer: 100,
                    ..Config::default()
                },
            ),
            (
                "max_headers",
                Config {
                    max_headers: 1000,
                    ..Config::default()
                },
            ),
            (
                "handshake_timeout",
                Config {
                    handshake_timeout: Duration::ZERO,
                    ..Config::default()
                },
            ),
            (
                "close_timeout",
                Config {
                    close_timeout: Duration::ZERO,
                    ..Config::default()
                },
            ),
            (
                "idle_timeout",
                Config {
                    idle_timeout: Duration::from_secs(u64::MAX / 4),
                    ..Config::default()
                },
            ),
            (
                "recv_buffer_size",
                Config {
                    recv_buffer_size: 0,
                    ..Config::default()
                },
            ),
            (
                "events_capacity",
                Config {
                    events_capacity: 0,
                    ..Config::default()
                },
            ),
        ];
        for (field, c) in cases {
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, field);
            assert!(e.to_string().contains(field));
        }
    }

    #[test]
    fn timeouts_under_a_millisecond_are_refused_and_zero_still_means_off() {
        let sub = Duration::from_micros(500);
        type Set = fn(&mut Config, Duration);
        let set: [(&str, Set); 7] = [
            ("handshake_timeout", |c, d| c.handshake_timeout = d),
            ("idle_timeout", |c, d| c.idle_timeout = d),
            ("close_timeout", |c, d| c.close_timeout = d),
            ("write_stall_timeout", |c, d| c.write_stall_timeout = d),
            ("max_lifetime", |c, d| c.max_lifetime = d),
            ("shutdown_timeout", |c, d| c.shutdown_timeout = d),
            ("audit_interval", |c, d| c.audit_interval = d),
        ];
        for (field, f) in set {
            let mut c = Config::default();
            f(&mut c, sub);
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, field);
            assert!(e.reason.contains("500µs"), "{e}");
            assert!(e.reason.contains("1 ms"), "{e}");
            for ok in [Duration::from_millis(1), Duration::from_micros(1500)] {
                f(&mut c, ok);
                assert_eq!(c.validate(), Ok(()), "{field} = {ok:?}");
            }
        }
        for off in [
            Config {
                idle_timeout: Duration::ZERO,
                ..Config::default()
            },
            Config {
                max_lifetime: Duration::ZERO,
                audit_interval: Duration::ZERO,
                shutdown_timeout: Duration::ZERO,
                ..Config::default()
            },
        ] {
            assert_eq!(off.validate(), Ok(()));
        }
        // The stall watchdog measures in nanoseconds: a short threshold is fine.
        let c = Config {
            stall_threshold: sub,
            ..Config::default()
        };
        assert_eq!(c.validate(), Ok(()));
    }

    #[test]
    fn tls_settings_are_checked() {
        let tls = |cert: &str, key: &str| Config {
            tls: Some(TlsConfig::new(cert, key)),
            ..Config::default()
        };
        assert_eq!(tls("cert.pem", "key.pem").validate(), Ok(()));
        assert_eq!(tls("", "key.pem").validate().unwrap_err().field, "tls_cert");
        assert_eq!(tls("cert.pem", "").validate().unwrap_err().field, "tls_key");
        // A TLS record must fit the receive buffer whole.
        let small = Config {
            recv_buffer_size: TLS_MIN_RECV_BUFFER - 1,
            ..tls("cert.pem", "key.pem")
        };
        assert_eq!(small.validate().unwrap_err().field, "recv_buffer_size");
        let least = Config {
            recv_buffer_size: TLS_MIN_RECV_BUFFER,
            ..tls("cert.pem", "key.pem")
        };
        assert_eq!(least.validate(), Ok(()));
        // The PROXY header comes in cleartext before the ClientHello (src/io/transport.rs).
        let proxied = Config {
            proxy_protocol: true,
            trusted_proxies: vec!["10.0.0.1".into()],
            ..tls("cert.pem", "key.pem")
        };
        assert_eq!(proxied.validate(), Ok(()));
        let capped = |n| Config {
            tls_max_handshakes: n,
            ..Config::default()
        };
        assert_eq!(capped(0).validate(), Ok(()));
        assert_eq!(capped(1 << 24).validate(), Ok(()));
        let e = capped((1 << 24) + 1).validate().unwrap_err();
        assert_eq!(e.field, "tls_max_handshakes");
    }

    #[test]
    fn the_headroom_and_the_handle_queue_bounds_are_checked() {
        for (field, c) in [
            (
                "fd_headroom",
                Config {
                    fd_headroom: 18446744073709551603,
                    ..Config::default()
                },
            ),
            (
                "handle_queue_commands",
                Config {
                    handle_queue_commands: 0,
                    ..Config::default()
                },
            ),
            (
                "handle_queue_bytes",
                Config {
                    handle_queue_bytes: 100,
                    ..Config::default()
                },
            ),
            (
                "max_topics_per_connection",
                Config {
                    max_topics_per_connection: 0,
                    ..Config::default()
                },
            ),
        ] {
            assert_eq!(c.validate().unwrap_err().field, field);
        }
        let c = Config {
            fd_headroom: MAX_FD_HEADROOM,
            ..Config::default()
        };
        assert_eq!(c.validate(), Ok(()));
    }
}
