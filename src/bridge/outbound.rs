//! The publisher's side of one Redis connection: a batch's `PUBLISH`es (or `SPUBLISH`es)
//! written into one buffer as RESP, sent with one write, and their replies read back in large
//! reads and parsed in place ([`resp::Reader`]), as the subscriber reads its messages: no
//! command object and no reply value per publication.

use crate::broker::HEADER;
use crate::protocol::resp::{self, Frame};
use std::io::{self, Read, Write};
use std::time::{Duration, Instant};

/// One connection's pipeline (see the module docs).
pub(super) struct Outbound {
    reader: resp::Reader,
    out: Vec<u8>,
    /// Commands in `out`.
    n: u64,
}

impl Outbound {
    pub(super) fn new() -> Self {
        Outbound {
            // Replies are integers, errors and `+PONG`: nothing needs a long bulk string.
            reader: resp::Reader::new(0),
            out: Vec::new(),
            n: 0,
        }
    }

    /// Add `command channel message` (the message: `header`, then `payload`).
    pub(super) fn publish(
        &mut self,
        command: &str,
        channel: &[u8],
        header: &[u8; HEADER],
        payload: &[u8],
    ) {
        let out = &mut self.out;
        bulk_head(out, b'*', 3);
        bulk_head(out, b'$', command.len());
        out.extend_from_slice(command.as_bytes());
        out.extend_from_slice(b"\r\n");
        bulk_head(out, b'$', channel.len());
        out.extend_from_slice(channel);
        out.extend_from_slice(b"\r\n");
        bulk_head(out, b'$', HEADER + payload.len());
        out.extend_from_slice(header);
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
        self.n += 1;
    }

    /// Commands waiting to be sent.
    pub(super) fn pending(&self) -> u64 {
        self.n
    }

    /// Send the commands added and read their replies: how many Redis acknowledged, and the
    /// first error (a write or read failing, the connection closed, an error reply such as
    /// `MOVED`, or a reply that is not an integer), if any. The pipeline is empty after.
    pub(super) fn flush(&mut self, stream: &mut (impl Read + Write)) -> (u64, Result<(), String>) {
        let n = std::mem::take(&mut self.n);
        let written = stream.write_all(&self.out);
        self.out.clear();
        if let Err(e) = written {
            return (0, Err(e.to_string()));
        }
        let mut acked = 0;
        let mut first: Option<String> = None;
        let read = self.replies(stream, n, |f| match f {
            Frame::Int(_) => acked += 1,
            Frame::Error(e) => {
                first.get_or_insert_with(|| String::from_utf8_lossy(e).into_owned());
            }
            other => {
                first.get_or_insert_with(|| format!("unexpected reply {other:?}"));
            }
        });
        (acked, read.and(first.map_or(Ok(()), Err)))
    }

    /// `PING`: its round trip.
    pub(super) fn ping(&mut self, stream: &mut (impl Read + Write)) -> Result<Duration, String> {
        let t = Instant::now();
        stream
            .write_all(b"*1\r\n$4\r\nPING\r\n")
            .map_err(|e| e.to_string())?;
        let mut pong = false;
        self.replies(stream, 1, |f| pong = *f == Frame::Simple(b"PONG"))?;
        match pong {
            true => Ok(t.elapsed()),
            false => Err("PING: not answered PONG".into()),
        }
    }

    /// Read `n` replies (within the socket's read timeout each read), each handed to `each`.
    fn replies(
        &mut self,
        stream: &mut impl Read,
        n: u64,
        mut each: impl FnMut(&Frame<'_>),
    ) -> Result<(), String> {
        let mut got = 0;
        while got < n {
            match self.reader.next_frame() {
                Ok(Some(f)) => {
                    each(&f);
                    got += 1;
                    continue;
                }
                Ok(None) => {}
                Err(e) => return Err(e.to_string()),
            }
            match stream.read(self.reader.spare()) {
                Ok(0) => return Err("unexpected end of file".into()),
                Ok(k) => self.reader.filled(k),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.to_string()),
            }
        }
        Ok(())
    }
}

/// `*N\r\n` or `$N\r\n`.
fn bulk_head(out: &mut Vec<u8>, kind: u8, n: usize) {
    out.push(kind);
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut v = n;
    loop {
        at -= 1;
        digits[at] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose replies are given, and which keeps what was written to it.
    struct Fake {
        replies: io::Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            // One byte at a time: replies split across reads.
            let one = buf.len().min(1);
            self.replies.read(&mut buf[..one])
        }
    }

    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn fake(replies: &[u8]) -> Fake {
        Fake {
            replies: io::Cursor::new(replies.to_vec()),
            written: Vec::new(),
        }
    }

    #[test]
    fn a_pipeline_is_the_commands_as_redis_reads_them_and_counts_its_acknowledgements() {
        let mut o = Outbound::new();
        let header = [7u8; HEADER];
        o.publish("PUBLISH", b"wsloop:/a", &header, b"hi");
        o.publish("SPUBLISH", b"c", &header, &[0u8; 1000]);
        assert_eq!(o.pending(), 2);
        let mut s = fake(b":1\r\n:0\r\n");
        assert_eq!(o.flush(&mut s), (2, Ok(())));
        assert_eq!(o.pending(), 0);
        let mut want = b"*3\r\n$7\r\nPUBLISH\r\n$9\r\nwsloop:/a\r\n$22\r\n".to_vec();
        want.extend_from_slice(&header);
        want.extend_from_slice(b"hi\r\n*3\r\n$8\r\nSPUBLISH\r\n$1\r\nc\r\n$1020\r\n");
        want.extend_from_slice(&header);
        want.extend_from_slice(&[0u8; 1000]);
        want.extend_from_slice(b"\r\n");
        assert_eq!(s.written, want);
        // Nothing pending: nothing written, nothing read.
        let mut s = fake(b"");
        assert_eq!(o.flush(&mut s), (0, Ok(())));
        assert!(s.written.is_empty());
    }

    #[test]
    fn an_error_reply_or_a_lost_connection_fails_the_pipeline_and_counts_what_was_acknowledged() {
        let mut o = Outbound::new();
        let header = [0u8; HEADER];
        for _ in 0..3 {
            o.publish("SPUBLISH", b"c", &header, b"x");
        }
        let mut s = fake(b":1\r\n-MOVED 3999 127.0.0.1:7001\r\n:2\r\n");
        assert_eq!(
            o.flush(&mut s),
            (2, Err("MOVED 3999 127.0.0.1:7001".into()))
        );
        for _ in 0..3 {
            o.publish("PUBLISH", b"c", &header, b"x");
        }
        let mut s = fake(b":1\r\n");
        assert_eq!(o.flush(&mut s), (1, Err("unexpected end of file".into())));
        o.publish("PUBLISH", b"c", &header, b"x");
        let mut s = fake(b"+OK\r\n");
        let (acked, err) = o.flush(&mut s);
        assert_eq!(acked, 0);
        assert!(err.unwrap_err().contains("unexpected reply"));
        // PING.
        let mut s = fake(b"+PONG\r\n");
        assert!(o.ping(&mut s).is_ok());
        assert_eq!(s.written, b"*1\r\n$4\r\nPING\r\n");
        assert!(o
            .ping(&mut fake(b"-NOAUTH Authentication required.\r\n"))
            .is_err());
        assert!(o.ping(&mut fake(b"")).is_err());
    }

    #[test]
    fn lengths_are_decimal() {
        for n in [0usize, 9, 10, 99, 100, 65_536, usize::MAX] {
            let mut out = Vec::new();
            bulk_head(&mut out, b'$', n);
            assert_eq!(out, format!("${n}\r\n").into_bytes());
        }
    }
}
