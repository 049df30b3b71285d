//! The PROXY protocol (versions 1 and 2, as HAProxy and nginx's stream module send it) and the
//! `X-Forwarded-For` / `Forwarded` headers: how a trusted proxy tells us the real client address.
//! Sans-IO: bytes in, an address out.

use crate::config::ForwardedHeader;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The version 2 signature.
const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// The longest version 1 header, CRLF included.
const V1_MAX: usize = 107;
/// The longest version 2 header we accept, TLVs included: room for what proxies send (HAProxy's
/// SSL TLVs with the client certificate's subject, say) while a connection from a trusted
/// proxy holds at most this much while its header trickles in.
pub const V2_MAX: usize = 4096;

/// The result of parsing a PROXY header at the start of a connection's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProxyHeader {
    /// More bytes are needed.
    Partial,
    /// A complete header of `len` bytes. `source` is the original client's address, or `None`
    /// when the proxy did not convey one (v1 `UNKNOWN`, v2 `LOCAL` such as health checks, or an
    /// address family other than TCP over IPv4/IPv6).
    Complete {
        /// Header length: the WebSocket handshake starts right after it.
        len: usize,
        /// The client address the proxy reports, canonical (an IPv4-mapped IPv6 address is
        /// given as its IPv4 address).
        source: Option<SocketAddr>,
    },
}

/// A PROXY header that breaks the specification.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyError(pub &'static str);

impl std::fmt::Display for ProxyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "bad PROXY header: {}", self.0)
    }
}

impl std::error::Error for ProxyError {}

/// Parse a PROXY protocol header (v1 or v2) at the start of `buf`. A connection from a proxy
/// configured to send one must start with it, so anything else is an error; a prefix of a valid
/// header is `Partial`.
pub fn parse_proxy(buf: &[u8]) -> Result<ProxyHeader, ProxyError> {
    if buf.is_empty() {
        return Ok(ProxyHeader::Partial);
    }
    if buf[0] == b'\r' {
        parse_v2(buf)
    } else if buf[0] == b'P' {
        parse_v1(buf)
    } else {
        Err(ProxyError("not a PROXY header"))
    }
}

fn parse_v1(buf: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let prefix = b"PROXY ";
    let n = buf.len().min(prefix.len());
    if buf[..n] != prefix[..n] {
        return Err(ProxyError("not a PROXY header"));
    }
    let Some(end) = buf.iter().take(V1_MAX).position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError("v1 header longer than 107 bytes"))
        } else {
            Ok(ProxyHeader::Partial)
        };
    };
    if end == 0 || buf[end - 1] != b'\r' {
        return Err(ProxyError("v1 header must end with CRLF"));
    }
    let line = std::str::from_utf8(&buf[prefix.len()..end - 1])
        .map_err(|_| ProxyError("v1 header is not ASCII"))?;
    let parts: Vec<&str> = line.split(' ').collect();
    let len = end + 1;
    match parts.as_slice() {
        ["UNKNOWN", ..] => Ok(ProxyHeader::Complete { len, source: None }),
        [proto @ ("TCP4" | "TCP6"), src, _dst, sport, _dport] => {
            let ip: IpAddr = src.parse().map_err(|_| ProxyError("v1 source address"))?;
            if (*proto == "TCP4") != ip.is_ipv4() {
                return Err(ProxyError("v1 address does not match its family"));
            }
            let port: u16 = sport.parse().map_err(|_| ProxyError("v1 source port"))?;
            Ok(ProxyHeader::Complete {
                len,
                source: Some(SocketAddr::new(ip.to_canonical(), port)),
            })
        }
        _ => Err(ProxyError("v1 header fields")),
    }
}

fn parse_v2(buf: &[u8]) -> Result<ProxyHeader, ProxyError> {
    let n = buf.len().min(V2_SIG.len());
    if buf[..n] != V2_SIG[..n] {
        return Err(ProxyError("not a PROXY header"));
    }
    if buf.len() < 16 {
        return Ok(ProxyHeader::Partial);
    }
    let (ver_cmd, family) = (buf[12], buf[13]);
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError("v2 version"));
    }
    let body = u16::from_be_bytes([buf[14], buf[15]]) as usize;
    let len = 16 + body;
    if len > V2_MAX {
        return Err(ProxyError("v2 header too long"));
    }
    if buf.len() < len {
        return Ok(ProxyHeader::Partial);
    }
    let addr = &buf[16..len];
    let source = match (ver_cmd & 0x0f, family) {
        (0x0, _) => None, // LOCAL: the proxy's own connection (health check)
        (0x1, 0x11) if addr.len() >= 12 => {
            let ip = Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3]);
            Some(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([addr[8], addr[9]]),
            ))
        }
        (0x1, 0x21) if addr.len() >= 36 => {
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&addr[..16]);
            let ip = IpAddr::V6(Ipv6Addr::from(octets));
            Some(SocketAddr::new(
                ip.to_canonical(),
                u16::from_be_bytes([addr[32], addr[33]]),
            ))
        }
        (0x1, 0x11 | 0x21) => return Err(ProxyError("v2 address block too short")),
        (0x1, _) => None, // UNSPEC, UDP or unix sockets: no TCP client address
        _ => return Err(ProxyError("v2 command")),
    };
    Ok(ProxyHeader::Complete { len, source })
}

/// The client address from the forwarding header a chain of proxies sets (`values`: every line
/// of it, in order of appearance; `header`: which header it is).
///
/// The chain is read from the right, the end the proxy nearest to us wrote: trusted proxies are
/// skipped, and the first address that is not one is the client. The walk stops at the first
/// element that is not a valid address (`unknown`, an obfuscated name, bytes that are not
/// UTF-8, an empty element, a `Forwarded` element without `for=`): that element and everything
/// left of it were written by someone we cannot vouch for. When the walk stops (or the chain
/// ends) before an untrusted address, the client is the last valid hop it reached, a trusted
/// address (a client on a proxy's own host). `None` only when the rightmost element is not an
/// address, or there is no element: the caller must then account the connection under the
/// proxy's own address ([`forwarded_key`]), never leave it unaccounted. Every address comes out
/// canonical: an IPv4-mapped IPv6 address (`::ffff:10.0.0.9`) is its IPv4 address.
///
/// Call this only for a TCP peer that is a trusted proxy: headers from anyone else are the
/// client's word and must be ignored.
pub fn forwarded_client(
    header: ForwardedHeader,
    values: &[&[u8]],
    trusted: impl Fn(IpAddr) -> bool,
) -> Option<IpAddr> {
    let elements = values
        .iter()
        .rev()
        .flat_map(|v| v.split(|&b| b == b',').rev());
    let mut last_valid = None;
    for element in elements {
        let node = match header {
            ForwardedHeader::XForwardedFor => Some(element),
            ForwardedHeader::Forwarded => forwarded_for(element),
        };
        let Some(ip) = node.and_then(parse_node) else {
            break;
        };
        if !trusted(ip) {
            return Some(ip);
        }
        last_valid = Some(ip);
    }
    last_valid
}

/// The address a connection from the trusted proxy `proxy` is accounted under: the client
/// [`forwarded_client`] finds, or, when it finds none, the proxy itself. Fail closed: a request
/// whose client cannot be determined shares the proxy's per-address limits, it never escapes
/// them.
pub fn forwarded_key(
    proxy: IpAddr,
    header: ForwardedHeader,
    values: &[&[u8]],
    trusted: impl Fn(IpAddr) -> bool,
) -> IpAddr {
    forwarded_client(header, values, trusted).unwrap_or(proxy.to_canonical())
}

/// The value of the `for` parameter of one `Forwarded` element (`for=1.2.3.4;proto=https`).
/// None when there is none, or more than one (RFC 7239 section 4: a parameter may appear once
/// per element; which one a client smuggled in is not ours to guess, so the element is not an
/// address and the chain stops there).
fn forwarded_for(element: &[u8]) -> Option<&[u8]> {
    let mut fors = element.split(|&b| b == b';').filter_map(|pair| {
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (key, value) = (pair[..eq].trim_ascii(), &pair[eq + 1..]);
        key.eq_ignore_ascii_case(b"for").then_some(value)
    });
    let first = fors.next()?;
    fors.next().is_none().then_some(first)
}

/// An address as it appears in `X-Forwarded-For` or `Forwarded: for=`: `1.2.3.4`,
/// `1.2.3.4:5678`, `2001:db8::1`, `"[2001:db8::1]:5678"`, `"[2001:db8::1]"`; canonical
/// (IPv4-mapped IPv6 addresses become IPv4).
fn parse_node(raw: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(raw.trim_ascii()).ok()?;
    let s = s
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .unwrap_or(s);
    let ip = if let Ok(ip) = s.parse::<IpAddr>() {
        ip
    } else if let Ok(sa) = s.parse::<SocketAddr>() {
        sa.ip()
    } else {
        let inner = s.strip_prefix('[')?.strip_suffix(']')?;
        IpAddr::V6(inner.parse::<Ipv6Addr>().ok()?)
    };
    Some(ip.to_canonical())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, fam: u8, addr: &[u8]) -> Vec<u8> {
        let mut b = V2_SIG.to_vec();
        b.push(0x20 | cmd);
        b.push(fam);
        b.extend_from_slice(&(addr.len() as u16).to_be_bytes());
        b.extend_from_slice(addr);
        b
    }

    #[test]
    fn v1_tcp4_and_tcp6() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\nGET /";
        assert_eq!(
            parse_proxy(h),
            Ok(ProxyHeader::Complete {
                len: 45,
                source: Some("192.0.2.7:56324".parse().unwrap())
            })
        );
        let h = b"PROXY TCP6 2001:db8::7 2001:db8::1 4000 443\r\n";
        assert_eq!(
            parse_proxy(h),
            Ok(ProxyHeader::Complete {
                len: h.len(),
                source: Some("[2001:db8::7]:4000".parse().unwrap())
            })
        );
        assert_eq!(
            parse_proxy(b"PROXY UNKNOWN\r\n"),
            Ok(ProxyHeader::Complete {
                len: 15,
                source: None
            })
        );
    }

    #[test]
    fn v1_prefixes_are_partial_and_garbage_is_an_error() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 443\r\n";
        for i in 0..h.len() {
            assert_eq!(parse_proxy(&h[..i]), Ok(ProxyHeader::Partial), "prefix {i}");
        }
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",
            b"PROXY TCP4 2001:db8::7 2001:db8::1 1 2\r\n",
            b"PROXY TCP4 300.0.0.1 1.1.1.1 1 2\r\n",
            b"PROXY TCP4 1.1.1.1 1.1.1.1 70000 2\r\n",
            b"PROXY TCP4 1.1.1.1 1.1.1.1 1 2\n",
        ] {
            assert!(
                parse_proxy(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_proxy(&[b'P'; 200]).is_err());
        let mut long = b"PROXY ".to_vec();
        long.extend_from_slice(&[b'1'; 120]);
        assert!(
            parse_proxy(&long).is_err(),
            "v1 without CRLF within 107 bytes"
        );
    }

    #[test]
    fn v2_headers_with_large_tlvs_up_to_the_limit() {
        let mut a4 = vec![192, 0, 2, 7, 198, 51, 100, 1, 0, 1, 0, 2];
        // One TLV filling the header to exactly V2_MAX bytes: accepted.
        let tlv_len = V2_MAX - 16 - a4.len() - 3;
        a4.push(0x20); // PP2_TYPE_SSL
        a4.extend_from_slice(&(tlv_len as u16).to_be_bytes());
        a4.extend(std::iter::repeat_n(b'x', tlv_len));
        let h = v2(1, 0x11, &a4);
        assert_eq!(h.len(), V2_MAX);
        assert_eq!(
            parse_proxy(&h),
            Ok(ProxyHeader::Complete {
                len: V2_MAX,
                source: Some("192.0.2.7:1".parse().unwrap())
            })
        );
        // One byte more: refused as soon as the length is read.
        a4.push(b'x');
        let h = v2(1, 0x11, &a4);
        assert_eq!(parse_proxy(&h[..16]), Err(ProxyError("v2 header too long")));
    }

    #[test]
    fn v2_proxy_local_and_families() {
        let mut a4 = vec![192, 0, 2, 7, 198, 51, 100, 1];
        a4.extend_from_slice(&56324u16.to_be_bytes());
        a4.extend_from_slice(&443u16.to_be_bytes());
        let h = v2(1, 0x11, &a4);
        assert_eq!(
            parse_proxy(&h),
            Ok(ProxyHeader::Complete {
                len: 28,
                source: Some("192.0.2.7:56324".parse().unwrap())
            })
        );
        for i in 0..h.len() {
            assert_eq!(parse_proxy(&h[..i]), Ok(ProxyHeader::Partial), "prefix {i}");
        }
        let mut a6 = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        a6.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        a6.extend_from_slice(&4000u16.to_be_bytes());
        a6.extend_from_slice(&443u16.to_be_bytes());
        a6.extend_from_slice(&[0x04, 0, 1, 0]); // a TLV after the addresses is skipped
        assert_eq!(
            parse_proxy(&v2(1, 0x21, &a6)),
            Ok(ProxyHeader::Complete {
                len: 16 + a6.len(),
                source: Some("[2001:db8::7]:4000".parse().unwrap())
            })
        );
        assert_eq!(
            parse_proxy(&v2(0, 0x00, &[])),
            Ok(ProxyHeader::Complete {
                len: 16,
                source: None
            })
        );
        assert!(parse_proxy(&v2(1, 0x11, &[1, 2, 3])).is_err());
        assert!(parse_proxy(&v2(5, 0x11, &a4)).is_err());
        let mut wrong_version = v2(1, 0x11, &a4);
        wrong_version[12] = 0x11;
        assert!(parse_proxy(&wrong_version).is_err());
    }

    fn xff(values: &[&[u8]]) -> Option<IpAddr> {
        let trusted = |ip: IpAddr| ip.to_string().starts_with("10.");
        forwarded_client(ForwardedHeader::XForwardedFor, values, trusted)
    }

    fn fwd(values: &[&[u8]]) -> Option<IpAddr> {
        let trusted = |ip: IpAddr| ip.to_string().starts_with("10.");
        forwarded_client(ForwardedHeader::Forwarded, values, trusted)
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn forwarded_headers_pick_the_last_untrusted_hop() {
        assert_eq!(
            xff(&[b"203.0.113.9, 10.0.0.2", b"10.0.0.3"]),
            ip("203.0.113.9")
        );
        // A client-supplied (spoofed) first entry is not picked when a real hop follows it.
        assert_eq!(
            xff(&[b"1.1.1.1, 198.51.100.4, 10.0.0.2"]),
            ip("198.51.100.4")
        );
        let v: &[&[u8]] = &[b"for=192.0.2.60;proto=http, for=\"[2001:db8::1]:4711\""];
        assert_eq!(fwd(v), ip("2001:db8::1"));
        assert_eq!(fwd(&[b"For = 192.0.2.61 ; proto=https"]), ip("192.0.2.61"));
        assert_eq!(fwd(&[b"for=\"[2001:db8::2]\""]), ip("2001:db8::2"));
        assert_eq!(fwd(&[b"for=unknown"]), None);
        assert_eq!(fwd(&[b"proto=http"]), None, "no for=");
        assert_eq!(xff(&[b"garbage"]), None);
        assert_eq!(xff(&[]), None);
        assert_eq!(xff(&[b""]), None);
        assert_eq!(xff(&[b"192.0.2.1,"]), None, "an empty element at the end");
    }

    #[test]
    fn the_chain_is_read_from_the_proxy_end_and_stops_at_a_bad_element() {
        // Whatever the client wrote left of the proxy's entry cannot hide it.
        assert_eq!(xff(&[b"\xff, 192.0.2.5"]), ip("192.0.2.5"));
        assert_eq!(xff(&[b"198.51.100.1, \xff", b"192.0.2.6"]), ip("192.0.2.6"));
        assert_eq!(fwd(&[b"for=\"\xff\", for=192.0.2.7"]), ip("192.0.2.7"));
        assert_eq!(
            xff(&[b"192.0.2.8, unknown, 10.0.0.1"]),
            ip("10.0.0.1"),
            "last valid hop"
        );
        assert_eq!(xff(&[b"192.0.2.8, \"10.0.0.1, 10.0.0.2"]), ip("10.0.0.2"));
        assert_eq!(
            xff(&[b"10.0.0.1, 10.0.0.2"]),
            ip("10.0.0.1"),
            "all trusted: the first"
        );
        assert_eq!(xff(&[b"192.0.2.9, \xff"]), None, "nothing valid at the end");
        // A `for` twice in one element (a client's smuggled inside the proxy's) is no address.
        assert_eq!(fwd(&[b"for=192.0.2.11;for=198.51.100.2"]), None);
        assert_eq!(
            fwd(&[b"for=192.0.2.12, for=198.51.100.3;for=192.0.2.13"]),
            None,
            "the chain stops at the bad element"
        );
    }

    #[test]
    fn mapped_addresses_are_canonical_and_none_is_the_proxy() {
        assert_eq!(xff(&[b"::ffff:192.0.2.10"]), ip("192.0.2.10"));
        assert_eq!(xff(&[b"[::ffff:192.0.2.10]:80"]), ip("192.0.2.10"));
        // A mapped trusted proxy is trusted.
        assert_eq!(xff(&[b"192.0.2.11, ::ffff:10.0.0.1"]), ip("192.0.2.11"));
        let proxy: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        let key = |v: &[&[u8]]| {
            forwarded_key(proxy, ForwardedHeader::XForwardedFor, v, |ip| {
                ip.to_string().starts_with("10.")
            })
        };
        assert_eq!(Some(key(&[b"\xff"])), ip("10.0.0.1"));
        assert_eq!(Some(key(&[b"192.0.2.12"])), ip("192.0.2.12"));
        let h = b"PROXY TCP6 ::ffff:192.0.2.13 ::1 1 2\r\n";
        assert_eq!(
            parse_proxy(h),
            Ok(ProxyHeader::Complete {
                len: h.len(),
                source: Some("192.0.2.13:1".parse().unwrap())
            })
        );
    }
}
