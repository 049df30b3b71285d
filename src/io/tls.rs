//! The TLS configuration, made once when a server or cluster starts from the files
//! [`TlsConfig`] names and shared by every loop: rustls with the `ring` provider, TLS 1.2 and
//! 1.3, ALPN `http/1.1`, no client certificates. Every way the files can be wrong is a start-up
//! error naming the file: it cannot be read, holds no certificate or no key (PEM), the key does
//! not match the certificate, the certificate is past its `notAfter`, or (for a certificate
//! chosen by SNI) it is not valid for its name.
//!
//! The certificates are chosen per handshake by [`Certs`], rustls's certificate resolver: the
//! one named by the client's SNI if there is one for that name, else the default. They can be
//! read again while the server runs ([`TlsSetup::reload`], on SIGHUP in the binary): new
//! handshakes use the new ones, open connections keep theirs, and if any new file is wrong the
//! old set stays, the failure is logged and counted.

use crate::config::{ConfigError, TlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, ResolvesServerCertUsingSni};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};

/// What the loops share: the rustls configuration, and the certificates it serves.
#[derive(Clone, Debug)]
pub(crate) struct TlsSetup {
    pub(crate) config: Arc<ServerConfig>,
    certs: Arc<Certs>,
}

/// The certificates served, chosen per handshake (rustls's resolver), and where they are read
/// from again on a reload.
#[derive(Debug)]
struct Certs {
    source: TlsConfig,
    current: RwLock<Arc<CertSet>>,
    /// Reloads that took effect, and reloads that failed (the old set stayed).
    reloads: [AtomicU64; 2],
}

/// One set of certificates, read together.
#[derive(Debug)]
struct CertSet {
    default: Arc<CertifiedKey>,
    /// By SNI name, lowercase.
    by_name: HashMap<String, Arc<CertifiedKey>>,
    /// The soonest `notAfter` of them all, in seconds since 1970 (UTC).
    not_after: i64,
}

impl ResolvesServerCert for Certs {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let set = self.current.read().unwrap_or_else(|e| e.into_inner());
        let named = hello.server_name().filter(|_| !set.by_name.is_empty());
        let found = named.and_then(|name| match name.bytes().any(|b| b.is_ascii_uppercase()) {
            false => set.by_name.get(name),
            true => set.by_name.get(&name.to_ascii_lowercase()),
        });
        Some(found.unwrap_or(&set.default).clone())
    }
}

impl TlsSetup {
    /// The soonest `notAfter` of the certificates served now, in seconds since 1970 (UTC).
    pub(crate) fn not_after(&self) -> i64 {
        self.certs.set().not_after
    }

    /// Reloads that took effect, and reloads that failed.
    pub(crate) fn reloads(&self) -> [u64; 2] {
        self.certs.reloads.each_ref().map(|n| n.load(Relaxed))
    }

    /// Read every certificate and key again from the files the configuration names: new
    /// handshakes use them, open connections keep theirs. If any is wrong (the errors of
    /// start-up), the certificates served stay as they were; the error is logged and returned.
    /// Runs on the caller's thread: no loop waits for the files.
    pub(crate) fn reload(&self) -> Result<(), ConfigError> {
        match read_set(&self.certs.source, unix_now()) {
            Ok(set) => {
                let not_after = set.not_after;
                *self
                    .certs
                    .current
                    .write()
                    .unwrap_or_else(|e| e.into_inner()) = Arc::new(set);
                self.certs.reloads[0].fetch_add(1, Relaxed);
                log::info!(
                    "TLS certificates reloaded; the soonest expires on {}",
                    utc(not_after)
                );
                Ok(())
            }
            Err(e) => {
                self.certs.reloads[1].fetch_add(1, Relaxed);
                log::warn!("TLS reload failed, the certificates served are unchanged: {e}");
                Err(e)
            }
        }
    }
}

impl Certs {
    fn set(&self) -> Arc<CertSet> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// The TLS configuration `config` asks for, made now (`None`: plain TCP).
pub(crate) fn setup(config: &crate::config::Config) -> Result<Option<TlsSetup>, ConfigError> {
    config.tls.as_ref().map(|t| load(t, unix_now())).transpose()
}

/// Read and check the files `tls` names and make the configuration, as of `now` (seconds since
/// 1970, UTC) for the expiry check.
pub(crate) fn load(tls: &TlsConfig, now: i64) -> Result<TlsSetup, ConfigError> {
    let set = read_set(tls, now)?;
    let certs = Arc::new(Certs {
        source: tls.clone(),
        current: RwLock::new(Arc::new(set)),
        reloads: Default::default(),
    });
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| ConfigError {
            field: "tls_cert",
            reason: format!("TLS versions: {e}"),
        })?
        .with_no_client_auth()
        .with_cert_resolver(certs.clone());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    // After the handshake the records are wsloop's (src/io/tls_session.rs): rustls hands over
    // the traffic secrets.
    config.enable_secret_extraction = true;
    Ok(TlsSetup {
        config: Arc::new(config),
        certs,
    })
}

/// The crypto provider.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    // rustls 0.23.48 deprecates ring's provider because it has no post-quantum key exchange
    // (X25519MLKEM768, which needs aws-lc-rs); ring is kept because it builds with a C compiler
    // alone (issue 16). aws-lc-rs behind a feature is the way to post-quantum key exchange.
    #[allow(deprecated)]
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Read the default certificate and every SNI certificate `tls` names.
fn read_set(tls: &TlsConfig, now: i64) -> Result<CertSet, ConfigError> {
    let (default, mut not_after) = read_pair(
        &tls.cert_chain,
        &tls.private_key,
        now,
        ["tls_cert", "tls_key"],
    )?;
    let mut by_name = HashMap::new();
    for sni in &tls.sni {
        let fields = ["tls_sni", "tls_sni"];
        let (key, expires) = read_pair(&sni.cert_chain, &sni.private_key, now, fields)?;
        // rustls's own SNI resolver checks that the name is a DNS name the certificate is
        // valid for (a configuration mistake, caught here rather than by every client).
        ResolvesServerCertUsingSni::new()
            .add(&sni.name, (*key).clone())
            .map_err(|e| ConfigError {
                field: "tls_sni",
                reason: format!(
                    "{}: not a certificate for {:?}: {e}",
                    sni.cert_chain.display(),
                    sni.name
                ),
            })?;
        not_after = not_after.min(expires);
        by_name.insert(sni.name.to_ascii_lowercase(), key);
    }
    Ok(CertSet {
        default,
        by_name,
        not_after,
    })
}

/// Read and check one certificate chain and its key; errors name the file, under `fields`
/// (the certificate's, the key's).
fn read_pair(
    cert_path: &Path,
    key_path: &Path,
    now: i64,
    fields: [&'static str; 2],
) -> Result<(Arc<CertifiedKey>, i64), ConfigError> {
    let cert_err = |reason: String| ConfigError {
        field: fields[0],
        reason,
    };
    let key_err = |reason: String| ConfigError {
        field: fields[1],
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
    let expires = not_after(leaf).ok_or_else(|| {
        cert_err(format!(
            "{}: its first certificate is not a DER X.509 certificate with a validity",
            cert_path.display()
        ))
    })?;
    // The intermediates too: rustls sends the chain as it is, so one that is not a certificate
    // would fail every client's handshake rather than the start (or the reload).
    if let Some(i) = (1..certs.len()).find(|&i| not_after(&certs[i]).is_none()) {
        return Err(cert_err(format!(
            "{}: certificate {} of the chain is not a DER X.509 certificate",
            cert_path.display(),
            i + 1
        )));
    }
    if expires < now {
        return Err(cert_err(format!(
            "{}: the certificate expired on {} (notAfter)",
            cert_path.display(),
            utc(expires)
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
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_err(format!("{}: unusable private key: {e}", key_path.display())))?;
    let certified = CertifiedKey::new(certs, signing);
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
    Ok((Arc::new(certified), expires))
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
