//! The `Origin` policy against cross-site WebSocket hijacking: browsers send the page's origin
//! with every upgrade, and a page from another site must not ride on a user's cookies into
//! this server. Non-browser clients usually send no `Origin`; whether that is allowed is part of
//! the policy.

use std::fmt;

/// One allowed origin: exact (`https://app.example.com`, `http://localhost:8080`), any
/// subdomain of a domain (`https://*.example.com`, which does not match `https://example.com`
/// itself), or the literal `null` (sandboxed documents, `file:` pages).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Pattern {
    Exact(String),
    /// Scheme with "://", the domain suffix including its leading dot, and the port (none: the
    /// origin must have none either).
    Subdomain {
        scheme: String,
        suffix: String,
        port: Option<u16>,
    },
    Null,
}

/// Which origins may open a WebSocket. Built from
/// [`Config::allowed_origins`](crate::Config::allowed_origins) and
/// [`Config::allow_missing_origin`](crate::Config::allow_missing_origin); an empty list allows
/// every origin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OriginPolicy {
    patterns: Vec<Pattern>,
    allow_missing: bool,
}

/// Why an origin was refused (the 403 response's reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginRefusal {
    /// No `Origin` header, and the policy requires one.
    Missing,
    /// The header is not a serialized origin (`scheme://host[:port]` or `null`).
    Malformed,
    /// A well-formed origin that no pattern allows.
    NotAllowed,
}

impl OriginRefusal {
    /// The one-line reason sent with the 403.
    pub fn reason(self) -> &'static str {
        match self {
            OriginRefusal::Missing => "Origin header required",
            OriginRefusal::Malformed => "malformed Origin header",
            OriginRefusal::NotAllowed => "origin not allowed",
        }
    }
}

impl fmt::Display for OriginRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

impl OriginPolicy {
    /// A policy from patterns (see [`OriginPolicy`]). Patterns are compared case-insensitively;
    /// a pattern that is not an origin is an error naming it.
    pub fn new(patterns: &[String], allow_missing: bool) -> Result<Self, String> {
        let mut parsed = Vec::with_capacity(patterns.len());
        for p in patterns {
            let lower = p.trim().to_ascii_lowercase();
            if lower == "null" {
                parsed.push(Pattern::Null);
                continue;
            }
            let Some((scheme, host)) = lower.split_once("://") else {
                return Err(format!(
                    "origin pattern {p:?} has no scheme (like https://)"
                ));
            };
            if !is_scheme(scheme) || host.is_empty() || host.contains('/') {
                return Err(format!("origin pattern {p:?} is not scheme://host[:port]"));
            }
            if let Some(domain) = host.strip_prefix("*.") {
                match split_host(domain) {
                    Some((Host::Name(name), port)) => parsed.push(Pattern::Subdomain {
                        scheme: format!("{scheme}://"),
                        suffix: format!(".{name}"),
                        port,
                    }),
                    _ => return Err(format!("origin pattern {p:?} has a bad wildcard")),
                }
            } else if host.contains('*') {
                return Err(format!("origin pattern {p:?}: a wildcard must be the first label, as in https://*.example.com"));
            } else if split_host(host).is_none() {
                return Err(format!("origin pattern {p:?}: {host:?} is not host[:port]"));
            } else {
                parsed.push(Pattern::Exact(lower));
            }
        }
        Ok(OriginPolicy {
            patterns: parsed,
            allow_missing,
        })
    }

    /// Whether the policy restricts origins at all.
    pub fn is_active(&self) -> bool {
        !self.patterns.is_empty()
    }

    /// Check the request's `Origin` header value (`None` when absent).
    pub fn check(&self, origin: Option<&[u8]>) -> Result<(), OriginRefusal> {
        if !self.is_active() {
            return Ok(());
        }
        let Some(raw) = origin else {
            return if self.allow_missing {
                Ok(())
            } else {
                Err(OriginRefusal::Missing)
            };
        };
        let origin = std::str::from_utf8(raw)
            .map_err(|_| OriginRefusal::Malformed)?
            .trim()
            .to_ascii_lowercase();
        if origin == "null" {
            return match self.patterns.contains(&Pattern::Null) {
                true => Ok(()),
                false => Err(OriginRefusal::NotAllowed),
            };
        }
        let Some((scheme, authority)) = origin.split_once("://") else {
            return Err(OriginRefusal::Malformed);
        };
        if !is_scheme(scheme) {
            return Err(OriginRefusal::Malformed);
        }
        let (host, port) = split_host(authority).ok_or(OriginRefusal::Malformed)?;
        let allowed = self.patterns.iter().any(|p| match (p, host) {
            (Pattern::Exact(o), _) => *o == origin,
            (
                Pattern::Subdomain {
                    scheme: s,
                    suffix,
                    port: p,
                },
                Host::Name(name),
            ) => {
                origin.starts_with(s.as_str())
                    && name.len() > suffix.len()
                    && name.ends_with(suffix.as_str())
                    && port == *p
            }
            _ => false,
        });
        if allowed {
            Ok(())
        } else {
            Err(OriginRefusal::NotAllowed)
        }
    }
}

/// The host part of an origin: a domain name or IPv4 address (dot-separated labels), or a
/// bracketed IPv6 literal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Host<'a> {
    Name(&'a str),
    Literal,
}

/// A URI scheme (RFC 3986 section 3.1): a letter, then letters, digits, `+`, `-`, `.`.
fn is_scheme(s: &str) -> bool {
    let mut b = s.bytes();
    b.next().is_some_and(|c| c.is_ascii_alphabetic())
        && b.all(|c| c.is_ascii_alphanumeric() || b"+-.".contains(&c))
}

/// `host[:port]` of a serialized origin, or `None` when it is not one: the host is a name of
/// non-empty labels of letters, digits, `-` and `_` separated by single dots (no empty label,
/// so no leading, trailing or doubled dot), or an IPv6 address in brackets; the port, when
/// present, is 1 to 5 digits up to 65535. Anything else (`evil.com:.example.com`,
/// `[::1]:.example.com`, `..example.com`) is malformed.
fn split_host(authority: &str) -> Option<(Host<'_>, Option<u16>)> {
    let (host, port) = if let Some(rest) = authority.strip_prefix('[') {
        let (literal, after) = rest.split_once(']')?;
        literal.parse::<std::net::Ipv6Addr>().ok()?;
        (Host::Literal, after)
    } else {
        let end = authority.find(':').unwrap_or(authority.len());
        let (name, after) = authority.split_at(end);
        let label = |l: &str| {
            !l.is_empty()
                && l.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_".contains(&c))
        };
        if !name.split('.').all(label) {
            return None;
        }
        (Host::Name(name), after)
    };
    let port = match port.strip_prefix(':') {
        None if port.is_empty() => None,
        None => return None,
        Some(digits) => {
            if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|c| c.is_ascii_digit())
            {
                return None;
            }
            Some(digits.parse::<u16>().ok()?)
        }
    };
    Some((host, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(p: &[&str], missing: bool) -> OriginPolicy {
        let v: Vec<String> = p.iter().map(|s| s.to_string()).collect();
        OriginPolicy::new(&v, missing).unwrap()
    }

    #[test]
    fn empty_policy_allows_everything() {
        let p = policy(&[], false);
        assert!(!p.is_active());
        assert_eq!(p.check(None), Ok(()));
        assert_eq!(p.check(Some(b"https://evil.example")), Ok(()));
    }

    #[test]
    fn exact_origins_match_case_insensitively_and_with_ports() {
        let p = policy(&["https://App.example.com", "http://localhost:8080"], true);
        assert_eq!(p.check(Some(b"https://app.example.com")), Ok(()));
        assert_eq!(p.check(Some(b"HTTPS://APP.EXAMPLE.COM")), Ok(()));
        assert_eq!(p.check(Some(b"http://localhost:8080")), Ok(()));
        assert_eq!(
            p.check(Some(b"http://localhost:8081")),
            Err(OriginRefusal::NotAllowed)
        );
        assert_eq!(
            p.check(Some(b"http://app.example.com")),
            Err(OriginRefusal::NotAllowed),
            "scheme matters"
        );
        assert_eq!(
            p.check(Some(b"https://app.example.com.evil.net")),
            Err(OriginRefusal::NotAllowed)
        );
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        let p = policy(&["https://*.example.com"], true);
        assert_eq!(p.check(Some(b"https://a.example.com")), Ok(()));
        assert_eq!(p.check(Some(b"https://a.b.example.com")), Ok(()));
        assert_eq!(
            p.check(Some(b"https://example.com")),
            Err(OriginRefusal::NotAllowed)
        );
        assert_eq!(
            p.check(Some(b"https://evilexample.com")),
            Err(OriginRefusal::NotAllowed)
        );
        assert_eq!(
            p.check(Some(b"http://a.example.com")),
            Err(OriginRefusal::NotAllowed)
        );
        assert_eq!(
            p.check(Some(b"https://a.example.com.evil.net")),
            Err(OriginRefusal::NotAllowed)
        );
    }

    #[test]
    fn hosts_that_are_not_hosts_never_match_a_wildcard() {
        let p = policy(
            &["https://*.example.com", "https://*.example.org:8443"],
            true,
        );
        for bad in [
            &b"https://evil.com:.example.com"[..],
            b"https://[::1]:.example.com",
            b"https://..example.com",
            b"https://a..example.com",
            b"https://evil.com:8443.example.org:8443",
        ] {
            assert_eq!(
                p.check(Some(bad)),
                Err(OriginRefusal::Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // The port is part of the match: none in the pattern, none in the origin.
        assert_eq!(
            p.check(Some(b"https://a.example.com:443")),
            Err(OriginRefusal::NotAllowed)
        );
        assert_eq!(p.check(Some(b"https://a.example.org:8443")), Ok(()));
        assert_eq!(
            p.check(Some(b"https://a.example.org")),
            Err(OriginRefusal::NotAllowed)
        );
        assert_eq!(
            p.check(Some(b"https://[::1]:8443")),
            Err(OriginRefusal::NotAllowed)
        );
        assert_eq!(
            policy(&["http://[::1]:8080"], true).check(Some(b"http://[::1]:8080")),
            Ok(())
        );
    }

    #[test]
    fn missing_origin_follows_the_switch() {
        assert_eq!(policy(&["https://a.com"], true).check(None), Ok(()));
        assert_eq!(
            policy(&["https://a.com"], false).check(None),
            Err(OriginRefusal::Missing)
        );
    }

    #[test]
    fn malformed_origins_are_refused() {
        let p = policy(&["https://a.com"], true);
        for bad in [
            &b"a.com"[..],
            b"https://",
            b"://a.com",
            b"https://a.com/path",
            b"\xff\xfe",
            b"https://a com",
            b"java script://x",
            b"https://evil.com:.example.com",
            b"https://[::1]:.example.com",
            b"https://..example.com",
            b"https://.a.com",
            b"https://a.com.",
            b"https://a.com:",
            b"https://a.com:65536",
            b"https://a.com:80:80",
            b"https://[::1",
            b"https://[not-v6]",
            b"https://a.com@b.com",
            b"1https://a.com",
        ] {
            assert_eq!(
                p.check(Some(bad)),
                Err(OriginRefusal::Malformed),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn null_origin_needs_an_explicit_pattern() {
        assert_eq!(
            policy(&["https://a.com"], true).check(Some(b"null")),
            Err(OriginRefusal::NotAllowed)
        );
        assert_eq!(policy(&["null"], true).check(Some(b"null")), Ok(()));
    }

    #[test]
    fn bad_patterns_are_configuration_errors() {
        for bad in [
            "example.com",
            "https://",
            "https://*",
            "https://a.*.com",
            "https://x/y",
            "https://*.*.com",
            "https://*.a.com:x",
            "https://a..com",
            "https://a.com:99999",
            "ht tp://a.com",
        ] {
            assert!(
                OriginPolicy::new(&[bad.to_string()], true).is_err(),
                "{bad}"
            );
        }
    }
}
