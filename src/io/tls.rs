//! The TLS configuration, made once when a server or cluster starts from the files
//! [`TlsConfig`] names and shared by every loop: rustls with the `ring` provider, TLS 1.2 and
//! 1.3, ALPN `http/1.1`, no client certificates. Every way the files can be wrong is a start-up
//! error naming the file: it cannot be read, holds no certificate or no key (PEM), the key does
//! not match the certificate, or the certificate is past its `notAfter`.

use crate::config::{ConfigError, TlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::ServerConfig;
use std::path::Path;
use std::sync::Arc;

/// What the loops share: the rustls configuration, and when the certificate expires.
#[derive(Clone, Debug)]
pub(crate) struct TlsSetup {
    pub(crate) config: Arc<ServerConfig>,
    /// The server certificate's `notAfter`, in seconds since 1970 (UTC).
    pub(crate) not_after: i64,
}

/// The TLS configuration `config` asks for, made now (`None`: plain TCP).
pub(crate) fn setup(config: &crate::config::Config) -> Result<Option<TlsSetup>, ConfigError> {
    config.tls.as_ref().map(|t| load(t, unix_now())).transpose()
}

/// Read and check the files `tls` names and make the configuration, as of `now` (seconds since
/// 1970, UTC) for the expiry check.
pub(crate) fn load(tls: &TlsConfig, now: i64) -> Result<TlsSetup, ConfigError> {
    let (cert_path, key_path) = (&tls.cert_chain, &tls.private_key);
    let cert_err = |reason: String| ConfigError {
        field: "tls_cert",
        reason,
    };
    let key_err = |reason: String| ConfigError {
        field: "tls_key",
        reason,
    };
    let pem = read(cert_path).map_err(cert_err)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| cert_err(format!("{}: not a PEM file: {e}", cert_path.display())))?;
    let Some(leaf) = certs.first() else {
        return Err(cert_err(format!(
            "{}: no certificate in it (PEM \"BEGIN CERTIFICATE\")",
            cert_path.display()
        )));
    };
    let not_after = not_after(leaf).ok_or_else(|| {
        cert_err(format!(
            "{}: its first certificate is not a DER X.509 certificate with a validity",
            cert_path.display()
        ))
    })?;
    if not_after < now {
        return Err(cert_err(format!(
            "{}: the certificate expired on {} (notAfter)",
            cert_path.display(),
            utc(not_after)
        )));
    }
    let pem = read(key_path).map_err(key_err)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
        key_err(match e {
            rustls::pki_types::pem::Error::NoItemsFound => format!(
                "{}: no private key in it (PEM \"PRIVATE KEY\", \"RSA PRIVATE KEY\" or \"EC PRIVATE KEY\")",
                key_path.display()
            ),
            e => format!("{}: not a PEM private key: {e}", key_path.display()),
        })
    })?;
    // rustls 0.23.48 deprecates ring's provider because it has no post-quantum key exchange
    // (X25519MLKEM768, which needs aws-lc-rs); ring is kept because it builds with a C compiler
    // alone (issue 16). aws-lc-rs behind a feature is the way to post-quantum key exchange.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| key_err(format!("{}: unusable private key: {e}", key_path.display())))?;
    let certified = rustls::sign::CertifiedKey::new(certs.clone(), signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(rustls::Error::InconsistentKeys(_)) => {
            return Err(key_err(format!(
                "{} does not match the certificate in {}",
                key_path.display(),
                cert_path.display()
            )))
        }
        Err(e) => return Err(cert_err(format!("{}: {e}", cert_path.display()))),
    }
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| cert_err(format!("TLS versions: {e}")))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            cert_err(format!(
                "{} with {}: {e}",
                cert_path.display(),
                key_path.display()
            ))
        })?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsSetup {
        config: Arc::new(config),
        not_after,
    })
}

/// Seconds since 1970 now (UTC).
fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

fn read(path: &Path) -> Result<Vec<u8>, String> {
    crate::sys::read_config_file(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// The `notAfter` of a DER X.509 certificate, in seconds since 1970 (UTC): Certificate ::=
/// SEQUENCE { tbsCertificate SEQUENCE { [0] version OPTIONAL, serialNumber, signature,
/// issuer, validity SEQUENCE { notBefore, notAfter }, .. }, .. } (RFC 5280, 4.1).
fn not_after(der: &[u8]) -> Option<i64> {
    let (cert, _) = tlv(der, 0x30)?;
    let (tbs, _) = tlv(cert, 0x30)?;
    let mut rest = tbs;
    if rest.first() == Some(&0xa0) {
        rest = skip(rest)?; // version
    }
    for _ in 0..3 {
        rest = skip(rest)?; // serialNumber, signature, issuer
    }
    let (validity, _) = tlv(rest, 0x30)?;
    let after = skip(validity)?; // notBefore
    let tag = *after.first()?;
    let (time, _) = tlv(after, tag)?;
    parse_time(tag, time)
}

/// A DER element's tag, where its content starts and its length.
fn header(d: &[u8]) -> Option<(u8, usize, usize)> {
    let (tag, first) = (*d.first()?, *d.get(1)?);
    if first < 0x80 {
        return Some((tag, 2, first as usize));
    }
    let n = (first & 0x7f) as usize;
    if n == 0 || n > 4 {
        return None;
    }
    let mut len = 0usize;
    for i in 0..n {
        len = (len << 8) | *d.get(2 + i)? as usize;
    }
    Some((tag, 2 + n, len))
}

/// The content of the element at the start of `d` if its tag is `want`, and what follows it.
fn tlv(d: &[u8], want: u8) -> Option<(&[u8], &[u8])> {
    let (tag, start, len) = header(d)?;
    if tag != want {
        return None;
    }
    let end = start.checked_add(len)?;
    Some((d.get(start..end)?, d.get(end..)?))
}

/// What follows the element at the start of `d`.
fn skip(d: &[u8]) -> Option<&[u8]> {
    let (_, start, len) = header(d)?;
    d.get(start.checked_add(len)?..)
}

/// UTCTime (tag 0x17, `YYMMDDHHMMSSZ`, years 1950 to 2049) or GeneralizedTime (0x18,
/// `YYYYMMDDHHMMSSZ`), as RFC 5280 allows them, in seconds since 1970.
fn parse_time(tag: u8, t: &[u8]) -> Option<i64> {
    let digits = t.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let num = |s: &[u8]| s.iter().fold(0i64, |n, d| n * 10 + (d - b'0') as i64);
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => match num(&digits[..2]) {
            yy if yy < 50 => (2000 + yy, &digits[2..]),
            yy => (1900 + yy, &digits[2..]),
        },
        (0x18, 14) => (num(&digits[..4]), &digits[4..]),
        _ => return None,
    };
    let [month, day, hour, minute, second] = [0, 2, 4, 6, 8].map(|i| num(&rest[i..i + 2]));
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || minute > 59 {
        return None;
    }
    if second > 60 {
        return None;
    }
    Some(days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar (H. Hinnant's
/// algorithm).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `secs` since 1970 as `YYYY-MM-DD HH:MM:SS UTC`.
pub(crate) fn utc(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + (month <= 2) as i64;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_read_as_rfc_5280_writes_them() {
        assert_eq!(parse_time(0x17, b"700101000000Z"), Some(0));
        assert_eq!(parse_time(0x17, b"200102000000Z"), Some(1_577_923_200));
        assert_eq!(parse_time(0x17, b"491231235959Z"), Some(2_524_607_999));
        assert_eq!(parse_time(0x18, b"20500101000000Z"), Some(2_524_608_000));
        assert_eq!(parse_time(0x18, b"99991231235959Z"), Some(253_402_300_799));
        for bad in [
            &b"2001020000Z"[..],
            b"200102000000",
            b"201302000000Z",
            b"200100000000Z",
            b"20010200000+Z",
            b"200102250000Z",
        ] {
            assert_eq!(parse_time(0x17, bad), None, "{bad:?}");
        }
        assert_eq!(parse_time(0x18, b"200102000000Z"), None);
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1_577_923_200), "2020-01-02 00:00:00 UTC");
        assert_eq!(utc(253_402_300_799), "9999-12-31 23:59:59 UTC");
        for secs in [-86_400 * 400, 951_782_400, 4_107_542_400, 1_709_164_800] {
            let s = utc(secs);
            let digits: Vec<u8> = s.bytes().filter(u8::is_ascii_digit).collect();
            assert_eq!(parse_time(0x18, &[&digits[..], b"Z"].concat()), Some(secs));
        }
    }

    /// A certificate's structure walked down to its validity: with and without the version,
    /// long lengths, and truncated or mistagged input refused.
    #[test]
    fn not_after_is_found_in_the_certificate_structure() {
        fn el(tag: u8, content: &[u8]) -> Vec<u8> {
            let mut v = vec![tag];
            match content.len() {
                n if n < 0x80 => v.push(n as u8),
                n => v.extend([0x82, (n >> 8) as u8, n as u8]),
            }
            v.extend_from_slice(content);
            v
        }
        let validity = el(
            0x30,
            &[el(0x17, b"200101000000Z"), el(0x18, b"20300101000000Z")].concat(),
        );
        let issuer = el(0x30, &el(0x31, &[7u8; 200]));
        let body = |version: bool| {
            let mut tbs = Vec::new();
            if version {
                tbs.extend(el(0xa0, &el(0x02, &[2])));
            }
            tbs.extend(el(0x02, &[1, 2, 3]));
            tbs.extend(el(0x30, &el(0x06, &[42, 134, 72])));
            tbs.extend(&issuer);
            tbs.extend(&validity);
            tbs.extend(el(0x30, b"subject"));
            el(
                0x30,
                &[el(0x30, &tbs), el(0x30, b"sig alg"), el(0x03, b"sig")].concat(),
            )
        };
        for version in [true, false] {
            let der = body(version);
            assert_eq!(not_after(&der), Some(1_893_456_000));
            for cut in [1, 10, der.len() / 2] {
                assert_eq!(not_after(&der[..cut]), None);
            }
        }
        assert_eq!(not_after(&el(0x31, &body(true)[2..])), None);
        assert_eq!(not_after(b""), None);
    }
}
