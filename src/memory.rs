//! The memory budget: what the bytes a stranger can make the server buffer may add up to, beside
//! the fd budget. A loop accounts, by kind, every buffer that grows with what clients send or
//! fail to read ([`Kind`]), in its [`MemoryBudget`]; near the limit it sheds (refuses new
//! connections, and closes the connections that ask to grow past their share), and stops
//! shedding once usage has fallen back (hysteresis). The default limit comes from the cgroup's
//! memory limit, else from the machine's RAM ([`default_budget`]).
//!
//! No I/O but reading the limits from `/sys` and `/proc` at start; unit-tested here.

/// What a buffered byte is for, as `wsloop_memory_bytes{kind}` labels it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A request head being received, or a message being reassembled (at most
    /// `max_header_bytes` or `max_message_size` each).
    Partial = 0,
    /// Bytes a connection's socket did not take yet (at most `max_backpressure` and one
    /// message each).
    Queue = 1,
    /// One turn's publications for topic subscribers (at most `MAX_FRAMED` bytes, `MAX_PUBS`
    /// publications and `MAX_OWED` runs).
    Publications = 2,
    /// The loop's compression state (permessage-deflate's shared profile: its compressors,
    /// decompressor and compression buffer; the dedicated profile's state of its connections,
    /// bounded by the compression budget). Never shed: the shedding thresholds apply to the
    /// other kinds within what it leaves of the limit.
    Compression = 3,
    /// The TLS state of the loop's TLS connections between reads, counted at
    /// [`TLS_CONNECTION_BYTES`] each from accept to close (the ciphertext held of a
    /// connection's output is counted in its send queue). Never shed: the shedding thresholds
    /// apply to the other kinds within what it leaves, and a new TLS connection that would
    /// take it past half the limit is refused ([`MemoryBudget::tls_room`]).
    Tls = 4,
}

/// What one TLS connection's state holds on the heap between reads, as the budget counts it:
/// at most 3,761 bytes measured (TLS 1.3 in the handshake, after the server's first flight),
/// 2,384 established with TLS 1.3 and 2,088 with TLS 1.2, with P-256 and the `ring` provider
/// (`tests/tls_memory.rs`, which checks that this covers them, within 1 KiB). Its parts: the
/// connection (boxed), rustls's handshake state, then the two directions' keys and what rustls
/// keeps for key updates. The handshake's input not processed yet and a record not complete
/// yet count with the partial messages; ciphertext held for the socket with the send queue.
pub const TLS_CONNECTION_BYTES: usize = 4 * 1024;

impl Kind {
    /// Every kind, in the order of [`MemoryBudget::by_kind`].
    pub const ALL: [Kind; 5] = [
        Kind::Partial,
        Kind::Queue,
        Kind::Publications,
        Kind::Compression,
        Kind::Tls,
    ];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Partial => "partial_messages",
            Kind::Queue => "send_queues",
            Kind::Publications => "publications",
            Kind::Compression => "compression",
            Kind::Tls => "tls",
        }
    }
}

/// Shedding starts when usage reaches this share of the limit (in 1/16ths) ...
const HIGH_16THS: usize = 15;
/// ... and stops when it has fallen back to this share.
const LOW_16THS: usize = 12;

/// One loop's share of the memory budget and what it holds.
#[derive(Debug, Default)]
pub struct MemoryBudget {
    limit: usize,
    used: [usize; 5],
    /// Connections holding any counted bytes (those the shares are split between).
    holders: usize,
    shedding: bool,
    /// The most held since the heap was last trimmed.
    peak: usize,
    /// What was held at the last trim of a drain (see [`MemoryBudget::take_ended`]) while the
    /// drain may go on: the last of an attack's connections are often still closing then.
    tail: usize,
    /// Shedding stopped, or what is held drained (see [`MemoryBudget::take_ended`]), since it
    /// was last asked.
    ended: bool,
    /// Times shedding started.
    pub episodes: u64,
}

/// The least a holder's share is while shedding (so that thousands of connections holding
/// little cannot shrink everyone's share below a message): 64 KiB, or a sixteenth of the low
/// mark for a budget too small for that.
const MIN_SHARE: usize = 64 << 10;

impl MemoryBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: usize) -> Self {
        MemoryBudget {
            limit,
            ..Self::default()
        }
    }

    /// The limit, in bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Set the limit (a cluster's loop takes its share once the budget is planned).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
        self.update();
    }

    /// A buffer of `kind` went from `old` to `new` bytes. Returns whether the loop is shedding
    /// now.
    #[inline]
    pub fn resize(&mut self, kind: Kind, old: usize, new: usize) -> bool {
        let used = &mut self.used[kind as usize];
        debug_assert!(*used >= old, "{kind:?}: freeing {old} of {used}");
        *used = used.saturating_sub(old) + new;
        if new > old || self.shedding {
            self.update();
        } else if self.peak >= self.limit / 4 && self.used() <= self.limit / 16 {
            // Drained after holding a quarter of the budget or more (an attack's buffers, as a
            // rule, freed when it ended): time to give the allocator's free memory back.
            self.drained();
        } else if self.tail > self.limit / 256 && self.used() <= self.tail / 4 {
            // Three quarters of what was still held at that trim have gone since: again (at
            // most three times in all per drain, the last at a 256th of the limit or less).
            self.drained();
        }
        self.shedding
    }

    /// Bytes held, in all.
    pub fn used(&self) -> usize {
        self.used.iter().sum()
    }

    /// Bytes held, by kind, in the order of [`Kind::ALL`].
    pub fn by_kind(&self) -> [usize; 5] {
        self.used
    }

    /// Near the limit: new connections are refused and no connection may grow past its share.
    pub fn shedding(&self) -> bool {
        self.shedding
    }

    /// Over the limit itself.
    pub fn over(&self) -> bool {
        self.used() > self.limit
    }

    /// Where shedding stops (what the sheddable kinds may hold).
    pub fn low_mark(&self) -> usize {
        self.room() / 16 * LOW_16THS
    }

    /// What the state shedding cannot reduce (compression's, with its own budget, and TLS's,
    /// at most half the limit) leaves of the limit for the kinds shedding can reduce.
    fn room(&self) -> usize {
        self.limit.saturating_sub(self.unsheddable())
    }

    /// What the compression and TLS state hold.
    fn unsheddable(&self) -> usize {
        self.used[Kind::Compression as usize] + self.used[Kind::Tls as usize]
    }

    /// Whether one more TLS connection's state ([`TLS_CONNECTION_BYTES`]) keeps the TLS state
    /// within half the limit.
    pub fn tls_room(&self) -> bool {
        self.used[Kind::Tls as usize] + TLS_CONNECTION_BYTES <= self.limit / 2
    }

    /// A connection's counted bytes went from `before` to `after`: it starts or stops being a
    /// holder.
    pub fn holder(&mut self, before: usize, after: usize) {
        match (before, after) {
            (0, 1..) => self.holders += 1,
            (1.., 0) => self.holders = self.holders.saturating_sub(1),
            _ => {}
        }
    }

    /// Connections holding counted bytes.
    pub fn holders(&self) -> usize {
        self.holders
    }

    /// What one holder may hold while shedding: an equal share of the point where shedding
    /// stops among the connections that hold anything, and at least 64 KiB (or a sixteenth
    /// of that point, if less).
    pub fn share(&self) -> usize {
        let low = self.low_mark();
        (low / self.holders.max(1)).max(MIN_SHARE.min(low / 16))
    }

    /// An equal part of the point where shedding stops among the connections that hold
    /// anything, with no floor: what a delivery to a subscriber may grow its queue to while the
    /// loop sheds.
    pub fn equal_part(&self) -> usize {
        self.low_mark() / self.holders.max(1)
    }

    /// Whether, since this was last asked, shedding stopped or what is held fell to a
    /// sixteenth of the limit after reaching a quarter of it, or, after such a fall, to a
    /// quarter of what was held then (the loop then gives the allocator's free memory back to
    /// the system, so that RSS follows what is held down after an attack, not only after
    /// shedding, and all the way down: what an attack's last connections free after the first
    /// trim goes back too).
    pub fn take_ended(&mut self) -> bool {
        std::mem::take(&mut self.ended)
    }

    /// What is held drained (see [`MemoryBudget::resize`]): a trim is due.
    fn drained(&mut self) {
        self.ended = true;
        self.peak = self.used();
        self.tail = self.used();
    }

    fn update(&mut self) {
        let all = self.used();
        self.peak = self.peak.max(all);
        // Shedding cannot reduce the compression or TLS state: judged on what it can reduce,
        // within what that state leaves (else state that stays above the low mark would keep
        // the loop shedding, refusing everyone, until those connections left).
        let used = all - self.unsheddable();
        let high = self.room() / 16 * HIGH_16THS;
        let low = self.room() / 16 * LOW_16THS;
        if !self.shedding && used >= high {
            self.shedding = true;
            self.episodes += 1;
        } else if self.shedding && used <= low {
            self.shedding = false;
            self.ended = true;
            self.peak = used;
        }
    }
}

/// A cgroup limit at or above this is no limit (cgroup v1 writes about 2^63 for "none").
const NO_LIMIT: u64 = 1 << 60;

/// The default budget, and where it came from: half the cgroup's memory limit (cgroup v2
/// `memory.max`, v1 `memory.limit_in_bytes`) when the process has one, else a quarter of the
/// machine's RAM (`MemTotal`), else 1 GiB.
pub fn default_budget() -> (usize, String) {
    if let Some(limit) = cgroup_limit() {
        return (
            (limit / 2) as usize,
            format!("half the cgroup memory limit of {limit} bytes"),
        );
    }
    if let Some(total) = mem_total() {
        return (
            (total / 4) as usize,
            format!("a quarter of {total} bytes of RAM"),
        );
    }
    (1 << 30, "1 GiB (no cgroup limit or MemTotal found)".into())
}

/// The memory limit of the process's cgroup, if it has one.
fn cgroup_limit() -> Option<u64> {
    let own = crate::sys::read_system_file("/proc/self/cgroup").unwrap_or_default();
    let mut candidates = Vec::new();
    for line in own.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            candidates.push(format!("/sys/fs/cgroup/{path}/memory.max"));
        } else if controllers.split(',').any(|c| c == "memory") {
            candidates.push(format!(
                "/sys/fs/cgroup/memory/{path}/memory.limit_in_bytes"
            ));
        }
    }
    candidates.push("/sys/fs/cgroup/memory.max".into());
    candidates.push("/sys/fs/cgroup/memory/memory.limit_in_bytes".into());
    candidates
        .iter()
        .filter_map(|p| parse_limit(&crate::sys::read_system_file(p)?))
        .min()
}

/// A cgroup limit file's value: `None` for "max" or a value meaning no limit.
fn parse_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < NO_LIMIT).then_some(v)
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn mem_total() -> Option<u64> {
    let info = crate::sys::read_system_file("/proc/meminfo")?;
    parse_mem_total(&info)
}

fn parse_mem_total(info: &str) -> Option<u64> {
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shedding_starts_near_the_limit_and_stops_when_usage_falls_back() {
        let mut b = MemoryBudget::new(16 << 20);
        assert!(!b.resize(Kind::Partial, 0, 14 << 20));
        assert!(
            b.resize(Kind::Queue, 0, 1 << 20),
            "15/16 of the limit: shedding"
        );
        assert_eq!(b.episodes, 1);
        assert!(!b.over());
        assert!(
            b.resize(Kind::Queue, 1 << 20, 2 << 20) && !b.over(),
            "at the limit"
        );
        assert!(b.resize(Kind::Queue, 2 << 20, 3 << 20) && b.over());
        // Freeing a little keeps shedding (hysteresis) ...
        assert!(b.resize(Kind::Partial, 14 << 20, 10 << 20));
        // ... until usage is back at 12/16.
        assert!(!b.take_ended());
        assert!(!b.resize(Kind::Partial, 10 << 20, 9 << 20));
        assert!(b.take_ended() && !b.take_ended(), "told once");
        assert_eq!(b.used(), 12 << 20);
        assert_eq!(b.by_kind(), [9 << 20, 3 << 20, 0, 0, 0]);
        assert!(
            !b.resize(Kind::Partial, 9 << 20, 9 << 20 | 1),
            "not at 15/16 again"
        );
        assert_eq!(b.episodes, 1);
    }

    /// Compression state is not shed: shedding is judged on the other kinds within what it
    /// leaves of the limit, so state above the low mark cannot keep the loop shedding.
    #[test]
    fn compression_state_narrows_the_room_but_never_wedges_shedding() {
        let mut b = MemoryBudget::new(16 << 20);
        b.resize(Kind::Compression, 0, 13 << 20);
        assert!(!b.shedding(), "the state alone never sheds");
        let room = 3 << 20;
        assert_eq!(b.low_mark(), room / 16 * 12);
        // 15/16 of the 3 MiB left: shedding; back to 12/16 of it: stops.
        assert!(b.resize(Kind::Partial, 0, room / 16 * 15));
        assert!(
            b.resize(Kind::Partial, room / 16 * 15, room / 16 * 13),
            "hysteresis"
        );
        assert!(!b.resize(Kind::Partial, room / 16 * 13, room / 16 * 12));
        assert!(b.take_ended());
        assert!(!b.shedding());
    }

    /// TLS state is not shed either, narrows the room as compression's does, and may take at
    /// most half the limit: one connection more is refused room.
    #[test]
    fn tls_state_takes_at_most_half_the_limit_and_never_wedges_shedding() {
        let mut b = MemoryBudget::new(64 * TLS_CONNECTION_BYTES);
        for n in 0..32 {
            assert!(b.tls_room(), "connection {n}");
            b.resize(Kind::Tls, 0, TLS_CONNECTION_BYTES);
        }
        assert!(!b.tls_room(), "past half the limit");
        assert!(!b.shedding(), "the state alone never sheds");
        b.resize(Kind::Compression, 0, 16 * TLS_CONNECTION_BYTES);
        let room = 16 * TLS_CONNECTION_BYTES;
        assert_eq!(b.low_mark(), room / 16 * 12);
        assert!(b.resize(Kind::Queue, 0, room / 16 * 15));
        assert!(!b.resize(Kind::Queue, room / 16 * 15, room / 16 * 12));
        b.resize(Kind::Tls, TLS_CONNECTION_BYTES, 0);
        assert!(b.tls_room(), "a connection left");
        assert_eq!(
            b.by_kind(),
            [0, room / 16 * 12, 0, room, 31 * TLS_CONNECTION_BYTES]
        );
    }

    /// Without shedding: holding a quarter of the budget or more, then draining to a sixteenth,
    /// asks for one trim; smaller swings never do.
    #[test]
    fn draining_after_holding_a_quarter_of_the_budget_asks_for_a_trim_once() {
        let mut b = MemoryBudget::new(16 << 20);
        b.resize(Kind::Queue, 0, 3 << 20);
        b.resize(Kind::Queue, 3 << 20, 0);
        assert!(!b.take_ended(), "3/16 is under a quarter");
        b.resize(Kind::Queue, 0, 4 << 20);
        b.resize(Kind::Queue, 4 << 20, 2 << 20);
        assert!(!b.take_ended(), "not drained to a sixteenth yet");
        b.resize(Kind::Queue, 2 << 20, 1 << 20);
        assert!(b.take_ended() && !b.take_ended(), "told once");
        b.resize(Kind::Queue, 1 << 20, 0);
        assert!(b.take_ended(), "the rest of the drain: told again");
        b.resize(Kind::Queue, 0, 3 << 20);
        b.resize(Kind::Queue, 3 << 20, 0);
        assert!(!b.take_ended(), "the peak and the tail were reset");
        assert_eq!(b.episodes, 0, "no shedding");
    }

    /// After the trim of a drain, each fall to a quarter of what was held at the last trim
    /// asks for another, until a trim found a 256th of the budget or less held.
    #[test]
    fn the_tail_of_a_drain_is_trimmed_too_a_bounded_number_of_times() {
        let mut b = MemoryBudget::new(64 << 20);
        b.resize(Kind::Queue, 0, 20 << 20);
        b.resize(Kind::Queue, 20 << 20, 4 << 20);
        assert!(b.take_ended(), "drained to a sixteenth");
        let mut trims = 1;
        let mut held = 4usize << 20;
        // The last connections leave, a KiB at a time.
        while held > 0 {
            let next = held - (1 << 10);
            b.resize(Kind::Queue, held, next);
            held = next;
            trims += b.take_ended() as u32;
        }
        // At 4 MiB, then about 1 MiB, 256 KiB (a 256th: the last).
        assert_eq!(trims, 3, "one trim per quarter, down to a 256th");
        b.resize(Kind::Queue, 0, 1 << 20);
        b.resize(Kind::Queue, 1 << 20, 0);
        assert!(!b.take_ended(), "a small swing after the drain: no trim");
    }

    #[test]
    fn a_share_is_an_equal_part_of_the_low_mark_among_holders_and_at_least_64_kib() {
        let mut b = MemoryBudget::new(16 << 20);
        assert_eq!(b.share(), 12 << 20, "no holder");
        b.holder(0, 100);
        assert_eq!((b.holders(), b.share()), (1, 12 << 20));
        b.holder(100, 200);
        assert_eq!(b.holders(), 1, "still one");
        for _ in 0..95 {
            b.holder(0, 1);
        }
        assert_eq!(b.share(), (12 << 20) / 96);
        for _ in 0..1000 {
            b.holder(0, 1);
        }
        assert_eq!(b.share(), 64 << 10, "never below 64 KiB");
        b.holder(200, 0);
        assert_eq!(b.holders(), 1095);
        // A budget too small for 64 KiB shares: a sixteenth of its low mark.
        let mut small = MemoryBudget::new(1 << 20);
        small.holder(0, 1);
        small.holder(0, 1);
        assert_eq!(small.share(), (1 << 20) / 2 * 12 / 16);
        for _ in 0..100 {
            small.holder(0, 1);
        }
        assert_eq!(small.share(), (1 << 20) / 16 * 12 / 16);
    }

    #[test]
    fn limits_are_read_from_cgroup_and_meminfo_formats() {
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(
            parse_limit("9223372036854771712\n"),
            None,
            "cgroup v1's none"
        );
        assert_eq!(parse_limit("536870912\n"), Some(512 << 20));
        assert_eq!(
            parse_mem_total("MemTotal:       24683784 kB\nMemFree: 1 kB\n"),
            Some(24683784 * 1024)
        );
        assert_eq!(parse_mem_total("MemFree: 1 kB\n"), None);
        let (bytes, why) = default_budget();
        assert!(bytes >= 1 << 20, "{bytes} ({why})");
    }
}
