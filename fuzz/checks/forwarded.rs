//! `forwarded`: the forwarding-header parser that names the client behind a trusted proxy
//! (`wsloop::protocol::proxy::forwarded_client` and `forwarded_key`).
//!
//! Input: `[flags, n]`, then `n` bytes the client wrote (anything at all), then the hops the
//! proxies appended, each `[selector, address bytes (4 or 16), port (2, if the form has one)]`.
//! flags bit 0: `Forwarded` (else `X-Forwarded-For`); bits 1-2: which invalid element ends the
//! client's part (`unknown`, a non-UTF-8 byte, an empty element, an obfuscated name). Selector:
//! bits 0-1 the form (IPv4, IPv4:port, IPv6, [IPv6]:port), bit 2 an IPv4-mapped IPv6 address,
//! bit 3 an address of a trusted proxy (10.0.0.0/8 or fd00::/8), bit 4 on a header line of its
//! own, bit 5 quoted, bit 6 spaces around, bit 7 (`Forwarded`) other parameters around `for=`.
//!
//! Properties:
//! - Nothing the client wrote changes the result: it is the rightmost appended hop that is not a
//!   trusted proxy, else the leftmost appended hop (the last valid hop from the proxy's end),
//!   else (nothing appended) none; always canonical (a mapped address is its IPv4 address).
//! - For the raw input as header lines of either kind: an address, if any, is canonical; none
//!   only when the rightmost element is not an address.
//! - "None" never means "unlimited": `forwarded_key` is the client or else the proxy, and the
//!   admission table counts it (a second connection under a limit of one is refused).

use super::util::Reader;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use wsloop::admission::TrustedProxies;
use wsloop::admission::{Admission, Verdict};
use wsloop::config::ForwardedHeader;
use wsloop::protocol::proxy::{forwarded_client, forwarded_key};

/// The proxy the connection comes from (mapped, to check that the fallback is canonical too).
const PROXY: Ipv6Addr = Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x0a00, 0x0001);

pub fn run(data: &[u8]) {
    let trusted = TrustedProxies::parse(&["10.0.0.0/8".into(), "fd00::/8".into()]).unwrap();
    let is_trusted = |ip: IpAddr| trusted.contains(ip);
    let mut r = Reader::new(data);
    let flags = r.u8();
    let header = match flags & 1 {
        0 => ForwardedHeader::XForwardedFor,
        _ => ForwardedHeader::Forwarded,
    };
    let n = r.u8() as usize;
    let client_part = r.bytes(n);

    let mut bytes = client_part.to_vec();
    bytes.push(b',');
    let end: &[u8] = match (flags >> 1) & 3 {
        0 => b"unknown",
        1 => b"\xff",
        2 => b"",
        _ => b"_hidden",
    };
    if header == ForwardedHeader::Forwarded && !end.is_empty() {
        bytes.extend_from_slice(b"for=");
    }
    bytes.extend_from_slice(end);
    let mut hops = Vec::new();
    while let Some((ip, text, own_line)) = hop(&mut r, header) {
        bytes.push(if own_line { b'\n' } else { b',' });
        bytes.extend_from_slice(&text);
        hops.push(ip);
    }
    let values: Vec<&[u8]> = bytes.split(|&b| b == b'\n').collect();
    let expected = hops
        .iter()
        .rev()
        .find(|ip| !is_trusted(**ip))
        .or(hops.first())
        .copied();
    let got = forwarded_client(header, &values, is_trusted);
    assert_eq!(
        got,
        expected,
        "{header:?} {:?}",
        String::from_utf8_lossy(&bytes)
    );
    accounted(header, &values, &is_trusted, got);

    // The raw input, as it came, for both headers.
    let raw: Vec<&[u8]> = data.split(|&b| b == b'\n').collect();
    for header in [ForwardedHeader::XForwardedFor, ForwardedHeader::Forwarded] {
        let got = forwarded_client(header, &raw, is_trusted);
        if let Some(ip) = got {
            assert_eq!(ip, ip.to_canonical(), "not canonical");
        }
        let last_line = raw.last().copied().unwrap_or_default();
        let last = last_line.rsplit(|&b| b == b',').next().unwrap_or_default();
        if got.is_none() {
            assert!(
                forwarded_client(header, &[last], |_| false).is_none(),
                "{header:?}: a valid rightmost element {:?} and no address",
                String::from_utf8_lossy(last)
            );
        }
        accounted(header, &raw, &is_trusted, got);
    }
}

/// The key is the client, or else the proxy, and the admission table counts it.
fn accounted(
    header: ForwardedHeader,
    values: &[&[u8]],
    trusted: &dyn Fn(IpAddr) -> bool,
    client: Option<IpAddr>,
) {
    let key = forwarded_key(IpAddr::V6(PROXY), header, values, trusted);
    let proxy = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));
    assert_eq!(key, client.unwrap_or(proxy));
    let mut admission = Admission::new(1, 0, 0);
    assert_eq!(admission.admit_address(key, 0), Ok(true), "counted");
    assert_eq!(
        admission.admit_address(key, 0),
        Err(Verdict::AddressFull),
        "limited"
    );
}

/// The next appended hop: its canonical address, its text in the header, and whether it starts
/// a header line of its own. `None` at the end of the input.
fn hop(r: &mut Reader<'_>, header: ForwardedHeader) -> Option<(IpAddr, Vec<u8>, bool)> {
    if r.is_empty() {
        return None;
    }
    let s = r.u8();
    let (form, mapped, trusted) = (s & 3, s & 4 != 0, s & 8 != 0);
    let v6 = form >= 2;
    let want = if v6 && !mapped { 16 } else { 4 };
    let raw = r.bytes(want);
    if raw.len() < want {
        return None;
    }
    let mut octets = [0u8; 16];
    octets[..want].copy_from_slice(raw);
    if trusted {
        octets[0] = if v6 && !mapped { 0xfd } else { 10 };
    }
    let v4 = Ipv4Addr::new(octets[0], octets[1], octets[2], octets[3]);
    let (ip, mut addr) = match (v6, mapped) {
        (false, _) => (IpAddr::V4(v4), v4.to_string()),
        (true, true) => (IpAddr::V4(v4), format!("::ffff:{v4}")),
        (true, false) => {
            let ip = Ipv6Addr::from(octets);
            (IpAddr::V6(ip).to_canonical(), ip.to_string())
        }
    };
    if form & 1 == 1 {
        let port = r.u16();
        addr = match v6 {
            true => format!("[{addr}]:{port}"),
            false => format!("{addr}:{port}"),
        };
    }
    if s & 32 != 0 {
        addr = format!("\"{addr}\"");
    }
    let mut text = match header {
        ForwardedHeader::XForwardedFor => addr,
        ForwardedHeader::Forwarded if s & 128 != 0 => {
            format!("by=_proxy;FOR={addr} ;proto=https")
        }
        ForwardedHeader::Forwarded => format!("for={addr}"),
    };
    if s & 64 != 0 {
        text = format!(" \t{text} ");
    }
    Some((ip, text.into_bytes(), s & 16 != 0))
}
