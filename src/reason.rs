//! Why a connection ended: [`CloseReason`], and every mapping from it in one table: the label
//! counted in metrics and logged, the close code reported to `on_close` when no close frame
//! decided it, whether the connection failed (its last answer is followed by a lingering close,
//! see below), and a line for the log. The loop decides a reason once, where the connection's
//! end is decided; everything else reads this table.
//!
//! A failed connection (a protocol error, a refused or timed-out handshake, a refused
//! admission, an answered plain HTTP request, a client closed for not reading what it was sent)
//! may still have input in flight: closing a socket
//! with unread input makes the kernel send a reset instead of a FIN, and the reset can discard
//! the answer just written. So after a failure the loop shuts down its side and discards input
//! until the peer's EOF or the close timeout.

use crate::protocol::close::CloseCode;
use std::io;

/// Why a connection ended. Each reason maps, in one table, to the close code reported, the
/// label counted in metrics and the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseReason {
    /// The request was not a valid upgrade, or the upgrade hook refused it, and got this status.
    Rejected(u16),
    /// A plain HTTP request (not an upgrade) was answered.
    HttpAnswered,
    /// The upgrade request did not complete within the handshake timeout (408).
    HandshakeTimeout,
    /// The client started the close handshake and we answered.
    PeerClosed,
    /// The application started the close handshake and the client answered.
    ClosedByServer,
    /// The client broke RFC 6455; we sent this close code.
    Protocol(CloseCode),
    /// Nothing arrived for the idle timeout, not even a pong to our ping.
    IdleTimeout,
    /// The client did not answer our close frame within the close timeout.
    CloseTimeout,
    /// The client closed TCP (or reset it) without a close handshake.
    Abnormal,
    /// Reading or writing the socket failed.
    IoError,
    /// The application terminated the connection.
    Terminated,
    /// The server shut down (whether or not the client answered its close frame in time).
    Shutdown,
    /// Refused at admission (connection limits or rate) and answered 503 or 429.
    Refused,
    /// More than the backpressure limit was queued: a send found it so (with the `Close`
    /// policy; close 1008), or the queue did not get back under half the limit within the
    /// write-stall timeout (dropped; 1008 reported).
    Backpressure,
    /// Queued bytes (under the backpressure limit) made no progress for the write-stall
    /// timeout.
    WriteStall,
    /// The connection reached its maximum lifetime (close 1001).
    MaxLifetime,
    /// An application callback panicked (close 1011).
    HandlerPanic,
    /// Closed to keep the loop within its memory budget: it grew its buffers past its share
    /// while the loop was shedding (close 1013, or 503 before the upgrade).
    Memory,
    /// TLS failed: the client sent garbage or cleartext instead of a ClientHello, a bad
    /// record, or an alert, or the handshake found nothing in common. Closed at once (the alert
    /// rustls queued is tried once before): nothing more can be said on a broken TLS stream.
    TlsError,
}

/// One row of the table: what a reason maps to.
struct Row {
    /// The label in metrics and logs.
    label: &'static str,
    /// The close code reported to `on_close` when no close frame decided it.
    code: CloseCode,
    /// The connection failed: its last answer is followed by a lingering close.
    failed: bool,
}

const fn row(label: &'static str, code: CloseCode, failed: bool) -> Row {
    Row {
        label,
        code,
        failed,
    }
}

/// The table, in the order of [`CloseReason::index`].
const TABLE: [Row; 19] = [
    row("rejected", CloseCode::ABNORMAL, true),
    row("http_answered", CloseCode::ABNORMAL, true),
    row("handshake_timeout", CloseCode::ABNORMAL, true),
    row("peer_closed", CloseCode::NORMAL, false),
    row("closed_by_server", CloseCode::NORMAL, false),
    // The code of a protocol error is the one it carries.
    row("protocol_error", CloseCode::PROTOCOL_ERROR, true),
    row("idle_timeout", CloseCode::GOING_AWAY, false),
    row("close_timeout", CloseCode::ABNORMAL, false),
    row("abnormal", CloseCode::ABNORMAL, false),
    row("io_error", CloseCode::ABNORMAL, false),
    row("terminated", CloseCode::ABNORMAL, false),
    row("shutdown", CloseCode::GOING_AWAY, false),
    row("refused", CloseCode::ABNORMAL, true),
    row("backpressure", CloseCode::POLICY_VIOLATION, true),
    row("write_stall", CloseCode::ABNORMAL, false),
    row("max_lifetime", CloseCode::GOING_AWAY, false),
    row("handler_panic", CloseCode::INTERNAL_ERROR, false),
    row("memory", CloseCode::TRY_AGAIN_LATER, true),
    row("tls_error", CloseCode::ABNORMAL, false),
];

impl CloseReason {
    /// Every label, in the order of [`CloseReason::index`], for exporting zero-valued counters.
    pub const LABELS: [&'static str; TABLE.len()] = {
        let mut labels = [""; TABLE.len()];
        let mut i = 0;
        while i < TABLE.len() {
            labels[i] = TABLE[i].label;
            i += 1;
        }
        labels
    };

    /// Index of this reason's row (and label in [`CloseReason::LABELS`]).
    pub fn index(self) -> usize {
        match self {
            CloseReason::Rejected(_) => 0,
            CloseReason::HttpAnswered => 1,
            CloseReason::HandshakeTimeout => 2,
            CloseReason::PeerClosed => 3,
            CloseReason::ClosedByServer => 4,
            CloseReason::Protocol(_) => 5,
            CloseReason::IdleTimeout => 6,
            CloseReason::CloseTimeout => 7,
            CloseReason::Abnormal => 8,
            CloseReason::IoError => 9,
            CloseReason::Terminated => 10,
            CloseReason::Shutdown => 11,
            CloseReason::Refused => 12,
            CloseReason::Backpressure => 13,
            CloseReason::WriteStall => 14,
            CloseReason::MaxLifetime => 15,
            CloseReason::HandlerPanic => 16,
            CloseReason::Memory => 17,
            CloseReason::TlsError => 18,
        }
    }

    /// The label used in logs and metrics.
    pub fn label(self) -> &'static str {
        TABLE[self.index()].label
    }

    /// The close code reported to `on_close` when no close frame decided it.
    pub fn code(self) -> CloseCode {
        match self {
            CloseReason::Protocol(code) => code,
            _ => TABLE[self.index()].code,
        }
    }

    /// Whether the connection failed, so that its last answer is followed by a lingering close
    /// (see the module docs) rather than an immediate one.
    pub fn is_failure(self) -> bool {
        TABLE[self.index()].failed
    }

    /// The reason for a failed read or write on the socket: the peer reset or closed it
    /// (`Abnormal`), TLS failed (`TlsError`: the transport reports it as `InvalidData`, which
    /// no socket error is), or anything else (`IoError`).
    pub fn of_io_error(e: &io::Error) -> CloseReason {
        match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => CloseReason::Abnormal,
            io::ErrorKind::InvalidData => CloseReason::TlsError,
            _ => CloseReason::IoError,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: [CloseReason; 19] = [
        CloseReason::Rejected(400),
        CloseReason::HttpAnswered,
        CloseReason::HandshakeTimeout,
        CloseReason::PeerClosed,
        CloseReason::ClosedByServer,
        CloseReason::Protocol(CloseCode::INVALID_PAYLOAD),
        CloseReason::IdleTimeout,
        CloseReason::CloseTimeout,
        CloseReason::Abnormal,
        CloseReason::IoError,
        CloseReason::Terminated,
        CloseReason::Shutdown,
        CloseReason::Refused,
        CloseReason::Backpressure,
        CloseReason::WriteStall,
        CloseReason::MaxLifetime,
        CloseReason::HandlerPanic,
        CloseReason::Memory,
        CloseReason::TlsError,
    ];

    #[test]
    fn every_reason_has_its_own_row_and_label() {
        for (i, r) in ALL.iter().enumerate() {
            assert_eq!(r.index(), i, "{r:?}");
            assert_eq!(CloseReason::LABELS[i], r.label());
        }
        let mut labels = CloseReason::LABELS.to_vec();
        labels.sort();
        labels.dedup();
        assert_eq!(labels.len(), ALL.len(), "labels repeat");
    }

    #[test]
    fn codes_and_failures_follow_the_table() {
        assert_eq!(
            CloseReason::Protocol(CloseCode::INVALID_PAYLOAD).code(),
            CloseCode::INVALID_PAYLOAD
        );
        assert_eq!(
            CloseReason::Backpressure.code(),
            CloseCode::POLICY_VIOLATION
        );
        assert_eq!(CloseReason::HandlerPanic.code(), CloseCode::INTERNAL_ERROR);
        assert_eq!(CloseReason::Shutdown.code(), CloseCode::GOING_AWAY);
        let failed: Vec<&str> = ALL
            .iter()
            .filter(|r| r.is_failure())
            .map(|r| r.label())
            .collect();
        assert_eq!(
            failed,
            [
                "rejected",
                "http_answered",
                "handshake_timeout",
                "protocol_error",
                "refused",
                "backpressure",
                "memory"
            ]
        );
    }

    #[test]
    fn io_errors_map_to_abnormal_or_io_error() {
        let reset = io::Error::from(io::ErrorKind::ConnectionReset);
        let pipe = io::Error::from(io::ErrorKind::BrokenPipe);
        let other = io::Error::other("x");
        let tls = io::Error::new(io::ErrorKind::InvalidData, "bad record");
        assert_eq!(CloseReason::of_io_error(&tls), CloseReason::TlsError);
        assert_eq!(CloseReason::of_io_error(&reset), CloseReason::Abnormal);
        assert_eq!(CloseReason::of_io_error(&pipe), CloseReason::Abnormal);
        assert_eq!(CloseReason::of_io_error(&other), CloseReason::IoError);
    }
}
