//! The audit log (SPEC §7): the record type here; the hash chain in `chain.rs`; the writer
//! thread and its handle [`AuditLog`] in `writer.rs`.
//!
//! One JSON object per line, fields in SPEC §7 order, then `seq` (1, 2, 3, … within a file) and
//! `hash` = `hex(sha256(line_without_hash || prev_hash_hex))`: `line_without_hash` is the record's
//! JSON object with `seq` as its last member, `prev_hash_hex` the previous line's `hash` (the 64
//! ASCII hex characters; nothing for the first record of a file). The line is that object with
//! `,"hash":"<64 hex>"` inserted before the closing `}`, so a verifier recovers the hashed bytes
//! by cutting that fixed-size suffix ([`verify_chain`]). The previous hash comes last so callers
//! can hash their own record in parallel (see `chain::Encoded`).
//!
//! Must never: drop a record to make room, carry anything but plain record data (no credential
//! value, token or query string: SPEC §7), or decide anything — the proxy owns the exactly-once
//! guard and the fail-closed reaction to `AuditLog::healthy() == false`.

mod chain;
mod writer;

pub use chain::{verify_chain, ChainError};
pub use writer::AuditLog;

use serde::{Serialize, Serializer};
use std::io;
use std::path::PathBuf;
use time::OffsetDateTime;

/// One request or CONNECT, as SPEC §7 lists it. Field order here is the order in the line;
/// `seq` and `hash` are appended by the writer. `None` serializes as `null`, so every line has
/// every key.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditRecord {
    /// RFC 3339 UTC with microseconds ([`AuditRecord::now_ts`]); the writer fills it if empty.
    pub ts: String,
    pub request_id: String,
    pub task: Option<String>,
    pub agent: Option<String>,
    pub decision: &'static str,
    pub reason: &'static str,
    pub method: String,
    pub scheme: &'static str,
    pub host: String,
    pub port: Option<u16>,
    /// The path as received, without the query string.
    #[serde(serialize_with = "path_without_query")]
    pub path: String,
    pub service: Option<String>,
    pub capability: Option<String>,
    pub route: Option<String>,
    pub risk: Option<&'static str>,
    /// The credential's name, never its value.
    pub credential: Option<String>,
    pub status: u16,
    pub upstream_ms: Option<f64>,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// Peer address of the agent's connection.
    pub client: String,
    pub policy_version: String,
    /// How an allowed request or a tunnel ended (`completed`, `client_closed`,
    /// `upstream_error`, a connect failure kind, ...); absent for refusals. Not in SPEC §7's
    /// list: an addition that tells a reviewer whether the agent saw the whole response.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome: Option<&'static str>,
}

// SECURITY: query values can carry secrets (`?api_key=...`); SPEC §7 forbids them in a record.
// The caller passes the path without the query, and this cut makes a mistake there harmless.
fn path_without_query<S: Serializer>(path: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(path.split_once('?').map_or(path, |(p, _)| p))
}

impl AuditRecord {
    /// Now, as the `ts` field wants it: "2026-11-22T08:53:37.123456Z".
    pub fn now_ts() -> String {
        format_ts(OffsetDateTime::now_utc())
    }
}

/// RFC 3339 in UTC with exactly six fractional digits. Formatted by hand: infallible, and no
/// formatting machinery on the request path (every record has one).
pub fn format_ts(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let mut s = String::with_capacity(27);
    // A year outside 0..=9999 cannot come from the system clock; it is clamped, not printed.
    push_decimal(&mut s, t.year().clamp(0, 9999) as u64, 4);
    s.push('-');
    push_decimal(&mut s, u8::from(t.month()).into(), 2);
    s.push('-');
    push_decimal(&mut s, t.day().into(), 2);
    s.push('T');
    push_decimal(&mut s, t.hour().into(), 2);
    s.push(':');
    push_decimal(&mut s, t.minute().into(), 2);
    s.push(':');
    push_decimal(&mut s, t.second().into(), 2);
    s.push('.');
    push_decimal(&mut s, t.microsecond().into(), 6);
    s.push('Z');
    s
}

/// The agent's address as records show it (`127.0.0.1:50312`, `[::1]:50312`).
pub fn format_client(addr: std::net::SocketAddr) -> String {
    match addr {
        std::net::SocketAddr::V4(v4) => {
            let mut s = String::with_capacity(21);
            for (i, octet) in v4.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                push_decimal(&mut s, octet.into(), 1);
            }
            s.push(':');
            push_decimal(&mut s, v4.port().into(), 1);
            s
        }
        std::net::SocketAddr::V6(_) => addr.to_string(),
    }
}

/// Appends `n` in decimal, zero-padded to at least `width` digits (at most 20, u64's widest).
pub(crate) fn push_decimal(s: &mut String, mut n: u64, width: usize) {
    let mut digits = [b'0'; 20];
    // The loop below writes at most `digits.len()` digits whatever `width` asks for.
    let width = width.clamp(1, digits.len());
    let mut at = digits.len();
    while n > 0 || digits.len() - at < width {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    for &d in &digits[at..] {
        s.push(char::from(d));
    }
}

/// Why the audit log cannot be opened or continued.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("cannot open the audit log `{}`: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot read the end of the audit log `{}` to continue its hash chain: {source}", path.display())]
    ReadTail { path: PathBuf, source: io::Error },
    #[error("the last MiB of the audit log `{}` holds no keyward audit record; move the file aside or set another audit.path", path.display())]
    NotAnAuditLog { path: PathBuf },
    #[error("cannot start the audit writer thread: {0}")]
    Spawn(io::Error),
    #[error("the audit writer stopped while opening the audit log")]
    WriterGone,
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn ts_is_rfc3339_utc_with_microseconds() {
        assert_eq!(
            format_ts(datetime!(2026-11-22 08:53:37.123456789 UTC)),
            "2026-11-22T08:53:37.123456Z"
        );
        assert_eq!(
            format_ts(datetime!(2026-01-02 03:04:05 +02:00)),
            "2026-01-02T01:04:05.000000Z"
        );
        let now = AuditRecord::now_ts();
        assert_eq!(now.len(), 27);
        assert!(now.ends_with('Z'));
    }

    #[test]
    fn client_reads_as_std_prints_it() {
        for addr in [
            "127.0.0.1:50312",
            "0.0.0.0:0",
            "255.255.255.255:65535",
            "[::1]:8080",
        ] {
            let a: std::net::SocketAddr = addr.parse().unwrap();
            assert_eq!(format_client(a), addr);
        }
    }

    #[test]
    fn decimals_are_zero_padded_to_width() {
        for (n, width, text) in [
            (0, 1, "0"),
            (7, 2, "07"),
            (123456, 6, "123456"),
            (42, 6, "000042"),
        ] {
            let mut s = String::new();
            push_decimal(&mut s, n, width);
            assert_eq!(s, text);
        }
        let mut s = String::new();
        push_decimal(&mut s, u64::MAX, 1);
        assert_eq!(s, u64::MAX.to_string());
        // A width past u64's 20 digits is capped, never a panic.
        let mut s = String::new();
        push_decimal(&mut s, 7, 25);
        assert_eq!(s, format!("{:020}", 7));
    }

    #[test]
    fn every_field_is_present_even_when_unknown() {
        let v: serde_json::Value = serde_json::to_value(AuditRecord::default()).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 22);
        assert!(obj["task"].is_null());
        assert!(obj["port"].is_null());
        assert!(obj["upstream_ms"].is_null());
    }

    #[test]
    fn query_string_never_reaches_the_record() {
        let rec = AuditRecord {
            path: "/v1/x?api_key=hunter2&b=1".into(),
            ..AuditRecord::default()
        };
        let line = serde_json::to_string(&rec).unwrap();
        assert!(line.contains(r#""path":"/v1/x""#));
        assert!(!line.contains("hunter2"));
    }

    #[test]
    fn hostile_strings_stay_inside_one_line() {
        let rec = AuditRecord {
            method: "GET\n{\"fake\":1}".into(),
            host: "a\u{0}b\r".into(),
            ..AuditRecord::default()
        };
        let line = serde_json::to_string(&rec).unwrap();
        assert!(!line.contains('\n') && !line.contains('\r') && !line.contains('\0'));
    }
}
