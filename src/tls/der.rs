//! The little DER and PEM keyward reads and writes itself: wrapping SEC1/PKCS#1 keys as PKCS#8
//! (rcgen's ring backend takes only PKCS#8), reading a CA certificate's validity and
//! basicConstraints (which webpki does not check on a trust anchor), and PEM-encoding.
//!
//! Owns no state and no policy: the callers decide what the facts mean. Must never: panic on
//! malformed input (every read is bounds-checked and returns `None`), or format its input into a
//! message (it may be key material).

use rustls::pki_types::AlgorithmIdentifier;
use time::OffsetDateTime;

/// PKCS#8 `PrivateKeyInfo ::= SEQUENCE { version 0, AlgorithmIdentifier, OCTET STRING key }`.
pub(super) fn wrap_pkcs8(alg: &AlgorithmIdentifier, private_key: &[u8]) -> Vec<u8> {
    let mut body = vec![0x02, 0x01, 0x00];
    body.extend(der_tlv(0x30, alg.as_ref()));
    body.extend(der_tlv(0x04, private_key));
    der_tlv(0x30, &body)
}

/// One DER element with a definite length in the shortest form, as DER requires.
pub(super) fn der_tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
    let len = contents.len();
    let mut out = Vec::with_capacity(len + 6);
    out.push(tag);
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
    out.extend_from_slice(contents);
    out
}

/// What keyward checks in a CA certificate beyond what webpki checks for a trust anchor.
pub(super) struct CertFacts {
    pub(super) is_ca: bool,
    pub(super) not_before: OffsetDateTime,
    pub(super) not_after: OffsetDateTime,
}

/// Reads basicConstraints `cA` and the validity period; `None` when the DER cannot be walked.
/// A minimal reader for these fields instead of a full X.509 parser dependency.
pub(super) fn cert_facts(cert_der: &[u8]) -> Option<CertFacts> {
    /// OID 2.5.29.19, basicConstraints.
    const BASIC_CONSTRAINTS: &[u8] = &[0x55, 0x1d, 0x13];
    let (_, cert, _) = der_next(cert_der)?;
    let (_, tbs, _) = der_next(cert)?;
    // TBSCertificate: [0] version, serialNumber, signature, issuer, validity, subject,
    // subjectPublicKeyInfo, [1] [2] unique ids, [3] extensions.
    let (version_tag, _, rest) = der_next(tbs)?;
    if version_tag != 0xa0 {
        return None; // v1: no extensions, so it cannot say it is a CA
    }
    let (_, _serial, rest) = der_next(rest)?;
    let (_, _signature, rest) = der_next(rest)?;
    let (_, _issuer, rest) = der_next(rest)?;
    let (_, validity, mut fields) = der_next(rest)?;
    let (tag, value, rest) = der_next(validity)?;
    let not_before = der_time(tag, value)?;
    let (tag, value, _) = der_next(rest)?;
    let not_after = der_time(tag, value)?;

    let extensions = loop {
        let (tag, value, rest) = der_next(fields)?;
        if tag == 0xa3 {
            break value;
        }
        fields = rest;
    };
    let (_, mut extensions, _) = der_next(extensions)?;
    let mut is_ca = false;
    while !extensions.is_empty() {
        let (_, extension, rest) = der_next(extensions)?;
        extensions = rest;
        let (_, oid, tail) = der_next(extension)?;
        if oid != BASIC_CONSTRAINTS {
            continue;
        }
        let (mut tag, mut value, rest) = der_next(tail)?;
        if tag == 0x01 {
            // the optional `critical` BOOLEAN
            (tag, value, _) = der_next(rest)?;
        }
        if tag != 0x04 {
            return None;
        }
        let (_, constraints, _) = der_next(value)?;
        is_ca = matches!(der_next(constraints), Some((0x01, [0xff], _)));
    }
    Some(CertFacts {
        is_ca,
        not_before,
        not_after,
    })
}

/// A DER UTCTime (`YYMMDDHHMMSSZ`, years 1950-2049) or GeneralizedTime (`YYYYMMDDHHMMSSZ`).
fn der_time(tag: u8, value: &[u8]) -> Option<OffsetDateTime> {
    let digits = value.strip_suffix(b"Z")?;
    if !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let number = |range: std::ops::Range<usize>| -> Option<u16> {
        std::str::from_utf8(digits.get(range)?).ok()?.parse().ok()
    };
    let (year, rest) = match (tag, digits.len()) {
        (0x17, 12) => {
            let yy = i32::from(number(0..2)?);
            (if yy >= 50 { 1900 + yy } else { 2000 + yy }, 2)
        }
        (0x18, 14) => (i32::from(number(0..4)?), 4),
        _ => return None,
    };
    let two = |at: usize| -> Option<u8> { u8::try_from(number(rest + at..rest + at + 2)?).ok() };
    let month = time::Month::try_from(two(0)?).ok()?;
    let date = time::Date::from_calendar_date(year, month, two(2)?).ok()?;
    let clock = time::Time::from_hms(two(4)?, two(6)?, two(8)?).ok()?;
    Some(time::PrimitiveDateTime::new(date, clock).assume_utc())
}

/// One DER element of `input`: (tag, contents, rest). `None` when truncated or not DER-shaped
/// (multi-byte tags and indefinite lengths never occur in the fields read here).
pub(crate) fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, input) = input.split_first()?;
    let (&first, input) = input.split_first()?;
    let (len, input) = if first < 0x80 {
        (usize::from(first), input)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > std::mem::size_of::<usize>() {
            return None;
        }
        let (bytes, input) = input.split_at_checked(count)?;
        let len = bytes
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, input)
    };
    let (contents, rest) = input.split_at_checked(len)?;
    Some((tag, contents, rest))
}

/// PEM-encodes `der`. Used to re-encode the certificate actually used, so `cert_pem()` never
/// returns other blocks (a bundle, comments) that happened to be in the file.
pub(super) fn pem_encode(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 0x3f) as usize]));
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    let mut rest = b64.as_str();
    while !rest.is_empty() {
        let (line, tail) = rest.split_at(rest.len().min(64));
        out.push_str(line);
        out.push('\n');
        rest = tail;
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::CertificateDer;

    use super::*;

    #[test]
    fn der_times_parse_both_encodings() {
        let at = |y, m, d, h, mi, s| {
            time::PrimitiveDateTime::new(
                time::Date::from_calendar_date(y, m, d).expect("date"),
                time::Time::from_hms(h, mi, s).expect("time"),
            )
            .assume_utc()
        };
        use time::Month::{December, January, November};
        assert_eq!(
            der_time(0x17, b"261122085337Z"),
            Some(at(2026, November, 22, 8, 53, 37))
        );
        assert_eq!(
            der_time(0x17, b"500101000000Z"),
            Some(at(1950, January, 1, 0, 0, 0))
        );
        assert_eq!(
            der_time(0x17, b"491231235959Z"),
            Some(at(2049, December, 31, 23, 59, 59))
        );
        assert_eq!(
            der_time(0x18, b"20991231235959Z"),
            Some(at(2099, December, 31, 23, 59, 59))
        );
        for bad in [
            &b"2611220853Z"[..],
            b"261322085337Z",
            b"26112208533+Z",
            b"261122085337",
        ] {
            assert_eq!(der_time(0x17, bad), None);
        }
        assert_eq!(der_time(0x18, b"261122085337Z"), None, "wrong length");
    }

    #[test]
    fn der_lengths_round_trip() {
        for len in [0usize, 1, 127, 128, 255, 256, 70_000] {
            let contents = vec![7u8; len];
            let encoded = der_tlv(0x04, &contents);
            let (tag, value, rest) = der_next(&encoded).expect("parse");
            assert_eq!((tag, value.len(), rest.len()), (0x04, len, 0));
        }
        assert_eq!(der_next(&[0x30, 0x05, 0x00]), None, "truncated");
        assert_eq!(der_next(&[0x30, 0x80]), None, "indefinite length");
    }

    #[test]
    fn pem_encoding_round_trips() {
        for len in [0usize, 1, 2, 3, 47, 48, 49, 500] {
            let der: Vec<u8> = (0..len).map(|i| (i * 37 % 256) as u8).collect();
            let pem = pem_encode("CERTIFICATE", &der);
            assert!(pem.lines().all(|line| line.len() <= 64));
            if len > 0 {
                let back = CertificateDer::from_pem_slice(pem.as_bytes()).expect("parse");
                assert_eq!(back.as_ref(), der.as_slice());
            }
        }
    }
}
