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

pub use chain::{verify_chain, verify_chain_from_middle, verify_whole, ChainError, Verified};
pub(crate) use writer::discards;
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
    /// Milliseconds to the microsecond ([`millis`]).
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
    /// What precisely a refusal refused, from a closed set (`dot_segment`, `host_override`,
    /// `header_lookalike`, `in_flight`, ...; the problem document's detail says it in words);
    /// absent when the reason says it all. An addition to SPEC §7, like `outcome`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<&'static str>,
}

/// A duration in milliseconds, to the microsecond: `2.521`, never `2.5218800000000003` (the
/// quotient of whole microseconds is the double nearest the decimal, which prints short).
pub fn millis(d: std::time::Duration) -> f64 {
    d.as_micros() as f64 / 1000.0
}

impl AuditRecord {
    /// Appends the record as JSON, byte for byte what the `Serialize` derive writes through
    /// serde_json (a test holds them equal). Every allowed request encodes one on its way out,
    /// and serde's per-field machinery (escaping each key at run time) was the largest part
    /// of keyward's own work per request.
    pub(crate) fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"ts\":");
        json_str(out, &self.ts);
        out.extend_from_slice(b",\"request_id\":");
        json_str(out, &self.request_id);
        out.extend_from_slice(b",\"task\":");
        json_opt_str(out, self.task.as_deref());
        out.extend_from_slice(b",\"agent\":");
        json_opt_str(out, self.agent.as_deref());
        out.extend_from_slice(b",\"decision\":");
        json_str(out, self.decision);
        out.extend_from_slice(b",\"reason\":");
        json_str(out, self.reason);
        out.extend_from_slice(b",\"method\":");
        json_str_capped(out, &self.method, SHORT_FIELD_MAX);
        out.extend_from_slice(b",\"scheme\":");
        json_str(out, self.scheme);
        out.extend_from_slice(b",\"host\":");
        json_str_capped(out, &self.host, SHORT_FIELD_MAX);
        out.extend_from_slice(b",\"port\":");
        match self.port {
            Some(port) => json_u64(out, port.into()),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"path\":");
        // A request no task stands behind (a 407, a head refused unread) is anyone's, and a
        // refused one cost its agent nothing: less of their paths is kept, so a flood of them
        // fills the audit disk several times slower.
        let path_max = match (&self.task, self.decision) {
            (Some(_), decision) if decision != "deny" => PATH_MAX,
            _ => SHORT_FIELD_MAX,
        };
        json_str_capped(out, without_query(&self.path), path_max);
        out.extend_from_slice(b",\"service\":");
        json_opt_str(out, self.service.as_deref());
        out.extend_from_slice(b",\"capability\":");
        json_opt_str(out, self.capability.as_deref());
        out.extend_from_slice(b",\"route\":");
        json_opt_str(out, self.route.as_deref());
        out.extend_from_slice(b",\"risk\":");
        json_opt_str(out, self.risk);
        out.extend_from_slice(b",\"credential\":");
        json_opt_str(out, self.credential.as_deref());
        out.extend_from_slice(b",\"status\":");
        json_u64(out, self.status.into());
        out.extend_from_slice(b",\"upstream_ms\":");
        match self.upstream_ms {
            // serde_json's own float formatting (and `null` for a non-finite value).
            Some(ms) => {
                let _ = serde_json::to_writer(&mut *out, &ms);
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"bytes_up\":");
        json_u64(out, self.bytes_up);
        out.extend_from_slice(b",\"bytes_down\":");
        json_u64(out, self.bytes_down);
        out.extend_from_slice(b",\"client\":");
        json_str(out, &self.client);
        out.extend_from_slice(b",\"policy_version\":");
        json_str(out, &self.policy_version);
        if let Some(outcome) = self.outcome {
            out.extend_from_slice(b",\"outcome\":");
            json_str(out, outcome);
        }
        if let Some(detail) = self.detail {
            out.extend_from_slice(b",\"detail\":");
            json_str(out, detail);
        }
        out.push(b'}');
    }
}

/// The longest `path` a record keeps (`SHORT_FIELD_MAX` for a request without a task, or
/// refused), and the longest `method` or `host`. SECURITY: these are
/// the agent's (or anyone's: a 407 is recorded too), and a request head may be 64 KiB; kept
/// whole, a flood of unauthenticated requests with long paths filled the audit disk at 60 KB a
/// record, after which keyward refuses every task (no record, no request). A longer one is
/// cut, and says how much was cut.
pub const PATH_MAX: usize = 2048;
pub const SHORT_FIELD_MAX: usize = 256;

/// `json_str` of `s`, cut so that what is written of it takes at most `max` bytes escaped (a
/// non-ASCII character takes 6 or 12: cutting the text at `max` bytes let 2 KiB of `é` become
/// 6 KiB), at a character's start, plus a note of how many bytes of `s` were cut:
/// `/a/b…(+58976 bytes)`.
fn json_str_capped(out: &mut Vec<u8>, s: &str, max: usize) {
    // No byte takes more than 6 escaped (a control byte's `\u0001`).
    if s.len().saturating_mul(6) <= max {
        return json_str(out, s);
    }
    let mut written = 0;
    let cut = s
        .char_indices()
        .find(|&(_, c)| {
            written += escaped_len(c);
            written > max
        })
        .map(|(at, _)| at);
    match cut.and_then(|cut| Some((s.get(..cut)?, s.len() - cut))) {
        None => json_str(out, s),
        Some((kept, rest)) => json_str(out, &format!("{kept}\u{2026}(+{rest} bytes)")),
    }
}

/// How many bytes `json_str` writes for `c`.
fn escaped_len(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' => 2,
        ' '..='~' => 1,
        _ => 6 * c.len_utf16(),
    }
}

/// A JSON string, in ASCII. Agent-chosen text (a method, a host, a path) may hold anything:
/// besides `"`, `\\` and control characters, every non-ASCII character is written as a
/// `\uXXXX` escape, so a record is one line for every reader (U+2028, U+0085 and the like
/// end a line for some) and shows what it holds (a bidirectional override would reorder it).
fn json_str(out: &mut Vec<u8>, s: &str) {
    out.push(b'"');
    if s.bytes()
        .all(|b| (0x20..0x7f).contains(&b) && b != b'"' && b != b'\\')
    {
        out.extend_from_slice(s.as_bytes());
    } else {
        for c in s.chars() {
            match c {
                '"' => out.extend_from_slice(b"\\\""),
                '\\' => out.extend_from_slice(b"\\\\"),
                '\n' => out.extend_from_slice(b"\\n"),
                '\r' => out.extend_from_slice(b"\\r"),
                '\t' => out.extend_from_slice(b"\\t"),
                ' '..='~' => out.push(c as u8),
                _ => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.extend_from_slice(b"\\u");
                        for shift in [12, 8, 4, 0] {
                            out.push(b"0123456789abcdef"[usize::from((*unit >> shift) & 0xf)]);
                        }
                    }
                }
            }
        }
    }
    out.push(b'"');
}

fn json_opt_str(out: &mut Vec<u8>, s: Option<&str>) {
    match s {
        Some(s) => json_str(out, s),
        None => out.extend_from_slice(b"null"),
    }
}

fn json_u64(out: &mut Vec<u8>, n: u64) {
    let mut buf = [b'0'; 20];
    out.extend_from_slice(decimal(&mut buf, n, 1));
}

// SECURITY: query values can carry secrets (`?api_key=...`); SPEC §7 forbids them in a record.
// The caller passes the path without the query, and this cut makes a mistake there harmless.
fn without_query(path: &str) -> &str {
    path.split_once('?').map_or(path, |(p, _)| p)
}

fn path_without_query<S: Serializer>(path: &str, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(without_query(path))
}

impl AuditRecord {
    /// Now, as the `ts` field wants it: "2026-11-22T08:53:37.123456Z".
    pub fn now_ts() -> String {
        let since_epoch = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        ts_since_epoch(since_epoch)
    }
}

/// The same text as [`format_ts`] for a time after the epoch. Every record asks for the
/// current time, and turning seconds into a calendar date is most of the cost: each thread
/// keeps the `YYYY-MM-DDTHH:MM:SS` of the last second it formatted and adds the microseconds.
fn ts_since_epoch(since_epoch: std::time::Duration) -> String {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
    }
    let secs = since_epoch.as_secs();
    let mut s = String::with_capacity(27);
    SECOND.with_borrow_mut(|(cached, prefix)| {
        if *cached != secs || prefix.is_empty() {
            let whole = i64::try_from(secs)
                .ok()
                .and_then(|secs| OffsetDateTime::from_unix_timestamp(secs).ok())
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
            let mut text = format_ts(whole);
            text.truncate(19);
            *cached = secs;
            *prefix = text;
        }
        s.push_str(prefix);
    });
    s.push('.');
    push_decimal(&mut s, since_epoch.subsec_micros().into(), 6);
    s.push('Z');
    s
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
pub(crate) fn push_decimal(s: &mut String, n: u64, width: usize) {
    let mut buf = [b'0'; 20];
    for &d in decimal(&mut buf, n, width) {
        s.push(char::from(d));
    }
}

/// `n` in decimal digits at the end of `buf`, zero-padded to at least `width` (1..=20).
fn decimal(buf: &mut [u8; 20], mut n: u64, width: usize) -> &[u8] {
    // The loop below writes at most `buf.len()` digits whatever `width` asks for.
    let width = width.clamp(1, buf.len());
    let mut at = buf.len();
    while n > 0 || buf.len() - at < width {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
    }
    &buf[at..]
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
    #[error("the audit log `{}` is in use by another process (another keyward with the same audit.path?): two writers would interleave two hash chains; give each keyward its own audit.path", path.display())]
    InUse { path: PathBuf },
    #[error("audit records would be discarded: {0}; set audit.path to a file, or give keyward a standard output that is read")]
    Discarded(&'static str),
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
    fn durations_print_to_the_microsecond_without_float_noise() {
        use std::time::Duration;
        assert_eq!(
            millis(Duration::from_nanos(2_521_880_123)).to_string(),
            "2521.88"
        );
        assert_eq!(millis(Duration::from_nanos(2_521_880)).to_string(), "2.521");
        for us in (0..200_000u64).step_by(7) {
            let text = millis(Duration::from_micros(us)).to_string();
            let decimals = text.split_once('.').map_or(0, |(_, d)| d.len());
            assert!(decimals <= 3, "{us} µs printed as {text}");
        }
    }

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
    fn write_json_writes_ascii_that_reads_back_as_what_the_serialize_derive_writes() {
        let same = |rec: &AuditRecord| {
            let mut ours = Vec::new();
            rec.write_json(&mut ours);
            assert!(ours.iter().all(|b| (0x20..0x7f).contains(b)), "{ours:?}");
            let serde = serde_json::to_vec(rec).unwrap();
            let ours: serde_json::Value = serde_json::from_slice(&ours).unwrap();
            let serde: serde_json::Value = serde_json::from_slice(&serde).unwrap();
            assert_eq!(ours, serde);
        };
        same(&AuditRecord::default());
        let strange = [
            "",
            "plain",
            "quote\" and \\ backslash",
            "\u{0}\u{1}\n\r\t\u{1f} controls",
            "\u{7f} del, é, 🦀, \u{2028}",
            "/p?api_key=secret&x=1",
            "</script>",
        ];
        let floats = [0.0, 0.1, 1e-7, 123_456.789, 1e300, f64::NAN, f64::INFINITY];
        for (i, text) in strange.iter().enumerate() {
            let rec = AuditRecord {
                ts: AuditRecord::now_ts(),
                request_id: format!("r-{i}{text}"),
                task: Some(text.to_string()),
                agent: (i % 2 == 0).then(|| text.to_string()),
                decision: "deny",
                reason: "ambiguous_request",
                method: text.to_string(),
                scheme: "https",
                host: text.to_string(),
                port: [None, Some(0), Some(443), Some(65535)][i % 4],
                path: text.to_string(),
                service: Some(text.to_string()),
                capability: None,
                route: Some(format!("GET /x/{text}")),
                risk: Some("high"),
                credential: Some("gh".into()),
                status: [0, 200, 403, 499][i % 4],
                upstream_ms: Some(floats[i % floats.len()]),
                bytes_up: [0, 1, u64::MAX][i % 3],
                bytes_down: 10u64.pow(i as u32),
                client: "[::1]:50312".into(),
                policy_version: text.to_string(),
                outcome: [None, Some("completed")][i % 2],
                detail: [None, None, Some("dot_segment")][i % 3],
            };
            same(&rec);
        }
        // Every character below U+0800, and the astral plane's first, inside a path.
        for c in (0u32..0x800)
            .chain([0x2028, 0x202e, 0xfeff, 0x1_0000])
            .filter_map(char::from_u32)
        {
            same(&AuditRecord {
                path: format!("/a{c}b"),
                ..AuditRecord::default()
            });
        }
    }

    #[test]
    fn the_per_second_cache_writes_what_format_ts_writes() {
        use std::time::Duration;
        // Within one second, across seconds, days, a leap day and back in time again.
        let secs = [
            1_795_337_617u64,
            1_795_337_617,
            1_795_337_618,
            1_795_337_617,
            1_795_391_999,
            1_795_392_000,
            1_709_164_800,
            0,
            253_402_300_799,
        ];
        for (i, s) in secs.into_iter().enumerate() {
            let d = Duration::new(s, (i as u32) * 123_456_789 % 1_000_000_000);
            let expected = format_ts(OffsetDateTime::UNIX_EPOCH + d);
            assert_eq!(ts_since_epoch(d), expected, "at {d:?}");
        }
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
    fn long_agent_chosen_fields_are_cut_and_say_by_how_much() {
        let rec = AuditRecord {
            method: "M".repeat(300),
            host: format!("{}.test", "h".repeat(400)),
            path: format!("/{}é{}", "a".repeat(2046), "b".repeat(60_000)),
            task: Some("t".into()),
            ..AuditRecord::default()
        };
        let mut line = Vec::new();
        rec.write_json(&mut line);
        assert!(line.len() < 4096, "{} bytes", line.len());
        let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
        assert_eq!(
            v["method"],
            format!("{}\u{2026}(+44 bytes)", "M".repeat(256))
        );
        assert!(v["host"]
            .as_str()
            .unwrap()
            .ends_with("\u{2026}(+149 bytes)"));
        // Cut at a character's start: `é` (6 bytes escaped) would end past byte 2048.
        let path = v["path"].as_str().unwrap();
        assert_eq!(path, format!("/{}\u{2026}(+60002 bytes)", "a".repeat(2046)));

        // The cap is on what is written: non-ASCII text (6 bytes a character escaped), quotes
        // and backslashes (2) are cut sooner.
        for (unit, escaped) in [("é", 6), ("\u{1F600}", 12), ("\"", 2), ("a", 1)] {
            let rec = AuditRecord {
                path: unit.repeat(3000),
                task: Some("t".into()),
                ..AuditRecord::default()
            };
            let mut line = Vec::new();
            rec.write_json(&mut line);
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            let kept = PATH_MAX / escaped;
            assert_eq!(
                v["path"],
                format!(
                    "{}\u{2026}(+{} bytes)",
                    unit.repeat(kept),
                    (3000 - kept) * unit.len()
                ),
                "{unit}"
            );
            assert!(line.len() < PATH_MAX + 1024, "{unit}: {} bytes", line.len());
        }
        // Without a task (a 407), or refused, 256 bytes of it.
        for (task, decision) in [(None, "deny"), (Some("t".to_string()), "deny")] {
            let rec = AuditRecord {
                path: "/a".repeat(3000),
                task,
                decision,
                ..AuditRecord::default()
            };
            let mut line = Vec::new();
            rec.write_json(&mut line);
            let v: serde_json::Value = serde_json::from_slice(&line).unwrap();
            assert_eq!(
                v["path"],
                format!("{}\u{2026}(+5744 bytes)", "/a".repeat(128))
            );
        }
    }

    #[test]
    fn hostile_strings_stay_inside_one_line() {
        let rec = AuditRecord {
            method: "GET\n{\"fake\":1}".into(),
            host: "a\u{0}b\r".into(),
            path: "/x/\u{2028}\u{85}\u{202e}live".into(),
            ..AuditRecord::default()
        };
        let mut line = Vec::new();
        rec.write_json(&mut line);
        let line = String::from_utf8(line).unwrap();
        assert!(line.is_ascii(), "{line}");
        assert_eq!(line.lines().count(), 1);
        assert!(
            line.contains(r#""path":"/x/\u2028\u0085\u202elive""#),
            "{line}"
        );
    }
}
