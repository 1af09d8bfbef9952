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
/// format-description parsing on the request path.
pub fn format_ts(t: OffsetDateTime) -> String {
    use std::fmt::Write as _;
    let t = t.to_offset(time::UtcOffset::UTC);
    let mut s = String::with_capacity(27);
    let _ = write!(
        s,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.microsecond()
    );
    s
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
