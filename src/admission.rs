//! Admission control: who may take a connection slot. Per-address connection counts and a
//! per-address token bucket for the new-connection rate. Clockless: time comes in as
//! milliseconds, so the rules are unit-tested without sleeping.

use std::collections::HashMap;
use std::net::IpAddr;

/// Why a new connection is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Refuse: the server holds `max_connections` already (503).
    ServerFull,
    /// Refuse: this address holds `max_connections_per_ip` already (503).
    AddressFull,
    /// Refuse: this address opens connections faster than its rate allows (429).
    RateLimited,
    /// Refuse: the loop is near its memory budget and sheds (503).
    MemoryBudget,
}

impl Verdict {
    /// Index of a refusal in [`Verdict::LABELS`].
    pub fn index(self) -> usize {
        match self {
            Verdict::ServerFull => 0,
            Verdict::AddressFull => 1,
            Verdict::RateLimited => 2,
            Verdict::MemoryBudget => 3,
        }
    }

    /// The labels of the refusals, in index order.
    pub const LABELS: [&'static str; 4] = [
        "max_connections",
        "max_connections_per_ip",
        "rate_per_ip",
        "memory_budget",
    ];

    /// The metric label of a refusal.
    pub fn label(self) -> &'static str {
        match self {
            Verdict::ServerFull => "max_connections",
            Verdict::AddressFull => "max_connections_per_ip",
            Verdict::RateLimited => "rate_per_ip",
            Verdict::MemoryBudget => "memory_budget",
        }
    }
}

/// A token bucket: `rate` tokens a second, holding at most `burst`. Clockless: time comes in
/// as milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    /// Tokens, in thousandths.
    milli_tokens: u64,
    /// When the bucket was last refilled, in ms.
    refilled_at: u64,
}

impl Bucket {
    /// A full bucket of `burst` tokens at `now_ms`.
    pub fn full(burst: u32, now_ms: u64) -> Bucket {
        Bucket {
            milli_tokens: burst as u64 * 1000,
            refilled_at: now_ms,
        }
    }

    /// Take a token at `now_ms`, refilling at `rate` a second up to `burst` first: false when
    /// the bucket is empty.
    pub fn take(&mut self, now_ms: u64, rate: u32, burst: u32) -> bool {
        let elapsed = now_ms.saturating_sub(self.refilled_at);
        let full = burst as u64 * 1000;
        self.milli_tokens = (self.milli_tokens + elapsed * rate as u64).min(full);
        self.refilled_at = now_ms.max(self.refilled_at);
        if self.milli_tokens < 1000 {
            return false;
        }
        self.milli_tokens -= 1000;
        true
    }

    /// Whether the bucket will have refilled to `burst` by `now_ms`.
    fn is_full(&self, now_ms: u64, rate: u32, burst: u32) -> bool {
        let elapsed = now_ms.saturating_sub(self.refilled_at);
        self.milli_tokens + elapsed * rate as u64 >= burst as u64 * 1000
    }
}

#[derive(Clone, Copy, Debug)]
struct Entry {
    /// Connections this address holds now.
    conns: u32,
    /// Its new-connection rate.
    bucket: Bucket,
}

/// Per-address accounting, keyed by canonical address: an IPv4-mapped IPv6 address
/// (`::ffff:10.0.0.9`) counts as its IPv4 address (`10.0.0.9`), and an IPv6 address counts as
/// its network of [`Admission::with_ipv6_prefix`] bits (a /64 by default: what one subscriber
/// of an ISP, or one host with privacy addresses, usually holds, so that one party cannot take
/// a fresh address for each connection). An address has an entry while it holds a connection or its bucket is
/// not full; [`Admission::sweep`] drops the others, so memory follows the addresses seen
/// recently, bounded by `max_tracked` (beyond it, new addresses are not rate limited until entries
/// free up: fail open, never refuse a stranger because of others' load).
#[derive(Debug)]
pub struct Admission {
    table: HashMap<IpAddr, Entry>,
    max_per_ip: u32,
    /// New connections per second per address (0: unlimited), and the bucket size.
    rate: u32,
    burst: u32,
    max_tracked: usize,
    /// Bits of an IPv6 address that make its key.
    ipv6_prefix: u8,
}

impl Admission {
    /// Limits: `max_per_ip` connections per address (0: unlimited); `rate` new connections per
    /// second per address with bursts of `burst` (rate 0: unlimited).
    pub fn new(max_per_ip: u32, rate: u32, burst: u32) -> Self {
        Admission {
            table: HashMap::new(),
            max_per_ip,
            rate,
            burst: burst.max(1),
            max_tracked: 1 << 16,
            ipv6_prefix: 64,
        }
    }

    /// Count IPv6 clients by their network of `bits` bits (1 to 128; 128: by address).
    pub fn with_ipv6_prefix(mut self, bits: u8) -> Self {
        self.ipv6_prefix = bits.clamp(1, 128);
        self
    }

    /// The key `ip` is counted under: its canonical form, an IPv6 address cut to its network.
    pub fn key(&self, ip: IpAddr) -> IpAddr {
        key_of(ip, self.ipv6_prefix)
    }

    fn tracking(&self) -> bool {
        self.max_per_ip > 0 || self.rate > 0
    }

    /// Decide on a new connection from `ip` at `now_ms`, with `open` connections served now out
    /// of `max_connections`. `Ok(true)`: admitted and counted against its address, to be released
    /// with [`Admission::release`] when it ends; `Ok(false)`: admitted, not counted (per-address
    /// limits off, or the table full); `Err`: refused, and why.
    pub fn admit(
        &mut self,
        ip: IpAddr,
        now_ms: u64,
        open: usize,
        max_connections: usize,
    ) -> Result<bool, Verdict> {
        if open >= max_connections {
            return Err(Verdict::ServerFull);
        }
        self.admit_address(ip, now_ms)
    }

    /// The per-address part of [`Admission::admit`] alone: for a connection that came through a
    /// trusted proxy, whose client address is known only once the proxy has told it.
    pub fn admit_address(&mut self, ip: IpAddr, now_ms: u64) -> Result<bool, Verdict> {
        let ip = self.key(ip);
        if !self.tracking() {
            return Ok(false);
        }
        if !self.table.contains_key(&ip) && self.table.len() >= self.max_tracked {
            return Ok(false); // fail open; see the type's docs
        }
        let e = self.table.entry(ip).or_insert(Entry {
            conns: 0,
            bucket: Bucket::full(self.burst, now_ms),
        });
        if self.max_per_ip > 0 && e.conns >= self.max_per_ip {
            return Err(Verdict::AddressFull);
        }
        if self.rate > 0 && !e.bucket.take(now_ms, self.rate, self.burst) {
            return Err(Verdict::RateLimited);
        }
        e.conns += 1;
        Ok(true)
    }

    /// An admitted connection from `ip` ended.
    pub fn release(&mut self, ip: IpAddr) {
        let ip = self.key(ip);
        if let Some(e) = self.table.get_mut(&ip) {
            e.conns = e.conns.saturating_sub(1);
        }
    }

    /// Drop entries that hold no connection and whose bucket has refilled by `now_ms`.
    pub fn sweep(&mut self, now_ms: u64) {
        let (rate, burst) = (self.rate, self.burst);
        self.table
            .retain(|_, e| e.conns > 0 || (rate > 0 && !e.bucket.is_full(now_ms, rate, burst)));
    }

    /// Connections counted for `ip`.
    pub fn count(&self, ip: IpAddr) -> u32 {
        self.table.get(&self.key(ip)).map_or(0, |e| e.conns)
    }

    /// Connections counted over all addresses (for consistency checks).
    pub fn total(&self) -> u64 {
        self.table.values().map(|e| e.conns as u64).sum()
    }

    /// Addresses tracked now.
    pub fn tracked(&self) -> usize {
        self.table.len()
    }
}

/// The proxies whose word on the client address is taken: single addresses (`10.0.0.5`,
/// `::1`) or networks in CIDR form (`10.0.0.0/8`, `fd00::/8`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustedProxies {
    nets: Vec<(IpAddr, u8)>,
}

impl TrustedProxies {
    /// Parse the list; an entry that is neither an address nor a network is an error naming it.
    pub fn parse(entries: &[String]) -> Result<Self, String> {
        let mut nets = Vec::with_capacity(entries.len());
        for e in entries {
            let (addr, len) = match e.trim().split_once('/') {
                Some((a, l)) => (a, Some(l)),
                None => (e.trim(), None),
            };
            let ip: IpAddr = addr
                .parse()
                .map_err(|_| format!("trusted proxy {e:?} is not an address or network"))?;
            let max = if ip.is_ipv4() { 32 } else { 128 };
            let len = match len {
                None => max,
                Some(l) => l
                    .parse::<u8>()
                    .ok()
                    .filter(|l| *l <= max)
                    .ok_or_else(|| format!("trusted proxy {e:?} has a bad prefix length"))?,
            };
            // An IPv4-mapped network (`::ffff:10.0.0.0/104`) is the IPv4 network it maps.
            match ip.to_canonical() {
                IpAddr::V4(v4) if ip.is_ipv6() && len >= 96 => nets.push((v4.into(), len - 96)),
                _ => nets.push((ip, len)),
            }
        }
        Ok(TrustedProxies { nets })
    }

    /// Whether any proxy is trusted at all.
    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// Whether `ip` is one of the trusted proxies (an IPv4-mapped IPv6 address is compared as
    /// its IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.nets
            .iter()
            .any(|(net, len)| match (net, ip.to_canonical()) {
                (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), *len),
                (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), *len),
                _ => false,
            })
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (bytes, rest) = ((bits / 8) as usize, bits % 8);
    if a[..bytes] != b[..bytes] {
        return false;
    }
    rest == 0 || {
        let mask = 0xffu8 << (8 - rest);
        a[bytes] & mask == b[bytes] & mask
    }
}

/// The key `ip` is counted under by every per-address limit: its canonical form (an
/// IPv4-mapped IPv6 address is its IPv4 address), an IPv6 address cut to its network of
/// `ipv6_prefix` bits.
pub fn key_of(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let mask = u128::MAX
                .checked_shl(128 - u32::from(ipv6_prefix))
                .unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn global_limit_refuses_when_full() {
        let mut a = Admission::new(0, 0, 0);
        assert_eq!(
            a.admit(ip("127.0.0.1"), 0, 9, 10),
            Ok(false),
            "admitted, not counted"
        );
        assert_eq!(
            a.admit(ip("127.0.0.1"), 0, 10, 10),
            Err(Verdict::ServerFull)
        );
        assert_eq!(
            a.tracked(),
            0,
            "no per-address state when per-address limits are off"
        );
    }

    #[test]
    fn per_ip_limit_is_per_address() {
        let mut a = Admission::new(2, 0, 0);
        let (x, y) = (ip("127.0.0.2"), ip("127.0.0.3"));
        assert_eq!(a.admit(x, 0, 0, 100), Ok(true));
        assert_eq!(a.admit(x, 0, 1, 100), Ok(true));
        assert_eq!(a.admit(x, 0, 2, 100), Err(Verdict::AddressFull));
        assert_eq!(a.admit(y, 0, 2, 100), Ok(true));
        a.release(x);
        assert_eq!(a.count(x), 1);
        assert_eq!(a.admit(x, 0, 2, 100), Ok(true));
        assert_eq!(a.total(), 3);
    }

    #[test]
    fn rate_limit_refills_over_time() {
        let mut a = Admission::new(0, 10, 3); // 10/s, burst 3
        let x = ip("::1");
        for _ in 0..3 {
            assert_eq!(a.admit(x, 1000, 0, 100), Ok(true));
        }
        assert_eq!(a.admit(x, 1000, 0, 100), Err(Verdict::RateLimited));
        assert_eq!(a.admit(x, 1099, 0, 100), Err(Verdict::RateLimited));
        assert_eq!(a.admit(x, 1100, 0, 100), Ok(true), "one token per 100 ms");
        assert_eq!(a.admit(x, 1100, 0, 100), Err(Verdict::RateLimited));
        // Other addresses have their own bucket (an IPv6 one outside this one's /64).
        assert_eq!(a.admit(ip("2001:db8::2"), 1100, 0, 100), Ok(true));
        assert_eq!(a.admit(ip("::2"), 1100, 0, 100), Err(Verdict::RateLimited));
    }

    #[test]
    fn a_bucket_refills_at_its_rate_up_to_its_burst() {
        let mut b = Bucket::full(2, 0);
        assert!(b.take(0, 4, 2) && b.take(0, 4, 2));
        assert!(!b.take(0, 4, 2), "burst spent");
        assert!(!b.take(249, 4, 2));
        assert!(b.take(250, 4, 2), "one token per 250 ms");
        assert!(b.take(10_000, 4, 2) && b.take(10_000, 4, 2));
        assert!(!b.take(10_000, 4, 2), "never more than the burst");
        assert!(!b.take(5_000, 4, 2), "a clock going back adds nothing");
    }

    #[test]
    fn sweep_forgets_idle_full_buckets_only() {
        let mut a = Admission::new(5, 10, 2);
        let (x, y) = (ip("10.0.0.1"), ip("10.0.0.2"));
        assert_eq!(a.admit(x, 0, 0, 100), Ok(true));
        assert_eq!(a.admit(y, 0, 0, 100), Ok(true));
        a.release(y);
        a.sweep(50);
        assert_eq!(a.tracked(), 2, "y's bucket is not full yet");
        a.sweep(100);
        assert_eq!(a.tracked(), 1, "y forgotten, x holds a connection");
        assert_eq!(a.count(x), 1);
    }

    #[test]
    fn a_mapped_address_is_its_ipv4_address() {
        let mut a = Admission::new(1, 0, 0);
        assert_eq!(a.admit(ip("::ffff:10.0.0.9"), 0, 0, 100), Ok(true));
        assert_eq!(
            a.admit(ip("10.0.0.9"), 0, 1, 100),
            Err(Verdict::AddressFull)
        );
        assert_eq!(a.count(ip("10.0.0.9")), 1);
        a.release(ip("10.0.0.9"));
        assert_eq!(a.count(ip("::ffff:10.0.0.9")), 0);
        assert_eq!(a.admit(ip("10.0.0.9"), 0, 0, 100), Ok(true));
    }

    #[test]
    fn ipv6_clients_count_by_their_network() {
        let mut a = Admission::new(1, 0, 0);
        assert_eq!(a.admit(ip("2001:db8:1234:5678::1"), 0, 0, 100), Ok(true));
        for other in ["2001:db8:1234:5678::2", "2001:db8:1234:5678:ffff::9"] {
            assert_eq!(
                a.admit(ip(other), 0, 1, 100),
                Err(Verdict::AddressFull),
                "{other}"
            );
        }
        assert_eq!(a.admit(ip("2001:db8:1234:5679::1"), 0, 1, 100), Ok(true));
        a.release(ip("2001:db8:1234:5678::77"));
        assert_eq!(a.count(ip("2001:db8:1234:5678::1")), 0);
        // By address, when configured so; IPv4 is never grouped.
        let mut a = Admission::new(1, 0, 0).with_ipv6_prefix(128);
        assert_eq!(a.admit(ip("2001:db8::1"), 0, 0, 100), Ok(true));
        assert_eq!(a.admit(ip("2001:db8::2"), 0, 1, 100), Ok(true));
        assert_eq!(a.admit(ip("10.0.0.1"), 0, 2, 100), Ok(true));
        assert_eq!(a.admit(ip("10.0.0.2"), 0, 3, 100), Ok(true));
        assert_eq!(a.key(ip("::ffff:10.0.0.2")), ip("10.0.0.2"));
        assert_eq!(
            Admission::new(1, 0, 0)
                .with_ipv6_prefix(48)
                .key(ip("2001:db8:1:2:3::4")),
            ip("2001:db8:1::")
        );
    }

    #[test]
    fn table_size_is_bounded_and_fails_open() {
        let mut a = Admission::new(1, 0, 0);
        a.max_tracked = 4;
        for i in 0..4u8 {
            assert_eq!(a.admit(IpAddr::from([10, 0, 0, i]), 0, 0, 100), Ok(true));
        }
        assert_eq!(a.admit(IpAddr::from([10, 0, 0, 9]), 0, 0, 100), Ok(false));
        assert_eq!(a.admit(IpAddr::from([10, 0, 0, 9]), 0, 0, 100), Ok(false));
        assert_eq!(a.tracked(), 4);
        assert_eq!(
            a.admit(IpAddr::from([10, 0, 0, 0]), 0, 0, 100),
            Err(Verdict::AddressFull)
        );
    }
}

#[cfg(test)]
mod trust_tests {
    use super::*;

    fn t(e: &[&str]) -> TrustedProxies {
        TrustedProxies::parse(&e.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
    }

    #[test]
    fn addresses_and_networks_match() {
        let p = t(&["10.0.0.0/8", "192.168.1.7", "fd00::/8", "127.0.0.0/31"]);
        for yes in [
            "10.1.2.3",
            "192.168.1.7",
            "fd12::1",
            "127.0.0.1",
            "127.0.0.0",
            "::ffff:10.0.0.1",
        ] {
            assert!(p.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in [
            "11.0.0.1",
            "192.168.1.8",
            "fe80::1",
            "127.0.0.2",
            "::ffff:11.0.0.1",
        ] {
            assert!(!p.contains(no.parse().unwrap()), "{no}");
        }
        assert!(t(&[]).is_empty());
        assert!(t(&["::ffff:192.0.2.0/120"]).contains("192.0.2.9".parse().unwrap()));
        assert!(t(&["0.0.0.0/0"]).contains("8.8.8.8".parse().unwrap()));
    }

    #[test]
    fn bad_entries_are_errors() {
        for bad in ["10.0.0.0/33", "example.com", "::1/129", "10.0.0.0/x", ""] {
            assert!(TrustedProxies::parse(&[bad.to_string()]).is_err(), "{bad}");
        }
    }
}
