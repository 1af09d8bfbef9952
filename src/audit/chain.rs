//! The hash chain of an audit file: appending a record as one chained line, finding where an
//! existing file's chain stands, and verifying a whole file.
//!
//! Must never: rewrite or truncate what is already in a file (only ever append), or accept a
//! line as a record unless its `hash` is exactly the fixed-size suffix the chain defines.

use super::{AuditError, AuditRecord};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// How far back from the end `continue_chain` looks for the last record. Records are a few
/// hundred bytes (paths are capped at 8 KiB by the matcher), so this spans thousands of them.
const TAIL_WINDOW: u64 = 1024 * 1024;
/// `,"hash":"` + 64 hex + `"}`: the suffix a verifier cuts to get the hashed bytes.
const HASH_SUFFIX_LEN: usize = 9 + 64 + 2;

/// A record serialized by the caller, waiting for its `seq` and `hash`: the JSON object without
/// its closing `}`, and a SHA-256 state that has already absorbed those bytes.
///
/// Why the chain hashes the line first and the previous hash last: SHA-256 absorbs input in
/// order, so this lets the callers (many tokio workers) do the expensive part — serializing and
/// hashing every full 64-byte block of the record — in parallel, while the single writer thread
/// only hashes the last block or two (`,"seq":N}` and the previous hash). Without SHA-NI, SHA-256
/// runs at ~100 MB/s here, which would cap a writer that hashes whole lines far below its target.
pub(super) struct Encoded {
    json: Box<[u8]>,
    hasher: Sha256,
}

impl Encoded {
    /// Bytes the serialized record holds.
    pub(super) fn len(&self) -> usize {
        self.json.len()
    }

    pub(super) fn new(rec: &AuditRecord) -> Encoded {
        // Big enough for a typical record; `into_boxed_slice` trims it, so queued records
        // hold only their own bytes.
        let mut json = Vec::with_capacity(1024);
        rec.write_json(&mut json);
        // A struct always serializes as `{...}`; the writer closes it after adding `seq`.
        json.pop();
        let hasher = Sha256::new_with_prefix(&json);
        Encoded {
            json: json.into_boxed_slice(),
            hasher,
        }
    }
}

/// Where the chain stands: the last `seq` written and that record's hash (lower-case hex).
#[derive(Debug, Default, Clone, PartialEq)]
pub(super) struct Chain {
    pub(super) seq: u64,
    pub(super) prev: Option<[u8; 64]>,
}

impl Chain {
    /// Appends the record to `buf` as one line (with `seq`, `hash` and `\n`) and advances the
    /// chain: `hash = hex(sha256(line_without_hash || prev_hash_hex))`.
    pub(super) fn append(&mut self, rec: Encoded, buf: &mut Vec<u8>) {
        let seq = self.seq + 1;
        buf.extend_from_slice(&rec.json);
        let tail = buf.len();
        buf.extend_from_slice(b",\"seq\":");
        let _ = write!(buf, "{seq}"); // writing to a Vec cannot fail
        buf.push(b'}');

        let mut hasher = rec.hasher;
        hasher.update(buf.get(tail..).unwrap_or_default());
        if let Some(prev) = &self.prev {
            hasher.update(prev);
        }
        let hex = hex_digest(&hasher.finalize().into());

        buf.pop();
        buf.extend_from_slice(b",\"hash\":\"");
        buf.extend_from_slice(&hex);
        buf.extend_from_slice(b"\"}\n");
        self.seq = seq;
        self.prev = Some(hex);
    }
}

/// Finds the last record of an existing file. Lines that are not records (a write torn by a
/// crash) are skipped with a warning and kept: a verifier will flag them, and refusing to start
/// after a crash would turn a torn line into an outage. The bool is true when the file does not
/// end with `\n` (a torn final line the caller must terminate before appending).
pub(super) fn continue_chain(file: &mut File, path: &Path) -> Result<(Chain, bool), AuditError> {
    let read_err = |source| AuditError::ReadTail {
        path: path.to_path_buf(),
        source,
    };
    let len = file.metadata().map_err(read_err)?.len();
    if len == 0 {
        return Ok((Chain::default(), false));
    }
    let window = len.min(TAIL_WINDOW);
    let start = len - window;
    let mut buf = vec![0u8; usize::try_from(window).unwrap_or(0)];
    file.seek(SeekFrom::Start(start)).map_err(read_err)?;
    file.read_exact(&mut buf).map_err(read_err)?;

    let torn_tail = buf.last() != Some(&b'\n');
    let segments: Vec<&[u8]> = buf.split(|&b| b == b'\n').collect();
    let mut skipped = 0usize;
    let mut found = None;
    for (i, line) in segments.iter().enumerate().rev() {
        let is_last = i + 1 == segments.len();
        // The final segment is "" after a '\n', or a torn fragment; the first one may begin
        // mid-line when the window does not reach the start of the file.
        if (is_last && !torn_tail) || (i == 0 && start > 0) || line.is_empty() {
            continue;
        }
        if is_last {
            skipped += 1;
            continue;
        }
        match parse_tail(line) {
            Some(chain) => {
                found = Some(chain);
                break;
            }
            None => skipped += 1,
        }
    }
    let chain = match found {
        Some(chain) => chain,
        None if start > 0 => {
            return Err(AuditError::NotAnAuditLog {
                path: path.to_path_buf(),
            })
        }
        None => Chain::default(),
    };
    if skipped > 0 {
        tracing::warn!(
            path = %path.display(),
            skipped,
            continue_after_seq = chain.seq,
            "audit log ends with lines that are not complete records (a torn write?); keeping them"
        );
    }
    Ok((chain, torn_tail))
}

/// `seq` and `hash` of a complete record line, or None.
fn parse_tail(line: &[u8]) -> Option<Chain> {
    #[derive(serde::Deserialize)]
    struct Tail {
        seq: u64,
        hash: String,
    }
    let tail: Tail = serde_json::from_slice(line).ok()?;
    let hex: [u8; 64] = tail.hash.as_bytes().try_into().ok()?;
    let suffix = line.get(line.len().checked_sub(HASH_SUFFIX_LEN)?..)?;
    let is_lower_hex = hex.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (is_lower_hex && suffix.get(9..73) == Some(&hex[..])).then_some(Chain {
        seq: tail.seq,
        prev: Some(hex),
    })
}

fn hex_digest(digest: &[u8; 32]) -> [u8; 64] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (pair, b) in out.chunks_exact_mut(2).zip(digest) {
        pair[0] = HEX[usize::from(b >> 4)];
        pair[1] = HEX[usize::from(b & 0x0f)];
    }
    out
}

/// Where and why a hash chain does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit line {line}: {problem}")]
pub struct ChainError {
    /// 1-based line number.
    pub line: usize,
    pub problem: &'static str,
}

/// Checks a whole audit file: every line a record, `seq` 1, 2, 3, … and every hash linking to
/// the one before. Returns the number of records.
pub fn verify_chain<R: BufRead>(reader: R) -> Result<u64, ChainError> {
    let verified = verify_whole(reader)?;
    match verified.not_records.first() {
        Some(&line) => Err(ChainError {
            line,
            problem: "not an audit record (a write cut short by a crash or a full disk?)",
        }),
        None => Ok(verified.records),
    }
}

/// The same, with what `audit verify` prints: the last record's hash (lowercase hex; kept
/// outside the file, it shows later whether records were cut off the end, which the chain
/// alone cannot) and the lines that are not records.
pub fn verify_whole(reader: impl BufRead) -> Result<Verified, ChainError> {
    verify_links(reader, false)
}

/// What a verified piece of an audit log holds.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    /// `seq` of its first record (1 for a whole file).
    pub first_seq: u64,
    pub records: u64,
    /// The last record's hash (lowercase hex).
    pub last: Option<String>,
    /// Lines (1-based) that are the start of a record cut short (never a whole JSON object):
    /// a write torn by a crash or a full disk, which the writer leaves in place when it starts
    /// again. The records around one must still link, so no record can be removed or altered
    /// behind it; like any cut at the end, only the chain end kept outside the file shows a
    /// last record cut short.
    pub not_records: Vec<usize>,
}

/// Checks a piece cut from the middle of an audit log (a collector's rotated chunk, a `grep`
/// of a merged stream): its first record is taken on trust (what it links to is not in the
/// piece), and every later one must link to the one before with the next `seq`.
pub fn verify_chain_from_middle<R: BufRead>(reader: R) -> Result<Verified, ChainError> {
    verify_links(reader, true)
}

fn verify_links<R: BufRead>(reader: R, from_middle: bool) -> Result<Verified, ChainError> {
    let mut prev: Option<[u8; 64]> = None;
    let mut first_seq = 1u64;
    let mut count = 0u64;
    let mut not_records = Vec::new();
    for (i, line) in reader.split(b'\n').enumerate() {
        let err = |problem| ChainError {
            line: i + 1,
            problem,
        };
        let line = line.map_err(|_| err("cannot be read"))?;
        let Some(chain) = parse_tail(&line) else {
            // The start of a record cut short, once: a torn write. Anything else (another
            // program's output), or two in a row, is not.
            // SECURITY: never a whole JSON object (a record written without a valid hash
            // would otherwise be skipped with a note, and read as real by everything else).
            const START: &[u8] = b"{\"ts\":\"";
            let starts = line.starts_with(START) || START.starts_with(&line);
            let whole = serde_json::from_slice::<serde::de::IgnoredAny>(&line).is_ok();
            // The writer ends a torn line before it appends: one record's start, never two.
            let once = memchr::memmem::find_iter(&line, START).count() <= 1;
            let torn = !line.is_empty() && starts && !whole && once;
            if !torn || not_records.last() == Some(&i) {
                return Err(err(
                    "not an audit record (another program's output mixed in?)",
                ));
            }
            not_records.push(i + 1);
            continue;
        };
        if count == 0 && from_middle {
            first_seq = chain.seq;
            count = 1;
            prev = chain.prev;
            continue;
        }
        if count == 0 && chain.seq != 1 {
            return Err(err(
                "the file starts after seq 1: the records before it are not here (a piece of a rotated or cut log? `--from-middle` checks the links after its first record)",
            ));
        }
        let body_len = line.len().saturating_sub(HASH_SUFFIX_LEN);
        let mut hasher = Sha256::new();
        hasher.update(line.get(..body_len).unwrap_or_default());
        hasher.update(b"}");
        if let Some(p) = &prev {
            hasher.update(p);
        }
        let expected = hex_digest(&hasher.finalize().into());
        if Some(expected) != chain.prev {
            return Err(err(
                "hash does not match (record altered, removed or reordered)",
            ));
        }
        // `seq` is the last member of the hashed object, so the parsed value is the hashed one.
        if chain.seq != first_seq + count {
            return Err(err("seq is not one more than the previous record's"));
        }
        count += 1;
        prev = chain.prev;
    }
    let last = prev.map(|h| String::from_utf8_lossy(&h).into_owned());
    Ok(Verified {
        first_seq,
        records: count,
        last,
        not_records,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn full_record(n: u16) -> AuditRecord {
        AuditRecord {
            ts: "2026-11-22T08:53:37.123456Z".into(),
            request_id: format!("req-{n}"),
            task: Some("TICKET-123".into()),
            agent: Some("triage-bot".into()),
            decision: "allow",
            reason: "allowed",
            method: "GET".into(),
            scheme: "https",
            host: "api.github.com".into(),
            port: Some(443),
            path: "/repos/acme/web/issues".into(),
            service: Some("github".into()),
            capability: Some("github.issues.read".into()),
            route: Some("GET /repos/{owner}/{repo}/issues".into()),
            risk: Some("low"),
            credential: Some("github_token".into()),
            status: 200 + n,
            upstream_ms: Some(12.5),
            bytes_up: 10,
            bytes_down: 2048,
            client: "127.0.0.1:50312".into(),
            policy_version: "0123456789abcdef".into(),
            outcome: None,
            detail: None,
        }
    }

    fn chain_of(n: u16) -> (Chain, Vec<u8>) {
        let mut chain = Chain::default();
        let mut buf = Vec::new();
        for i in 0..n {
            chain.append(Encoded::new(&full_record(i)), &mut buf);
        }
        (chain, buf)
    }

    fn lines(buf: &[u8]) -> Vec<Vec<u8>> {
        buf.split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(<[u8]>::to_vec)
            .collect()
    }

    fn join(lines: &[Vec<u8>]) -> Vec<u8> {
        lines
            .iter()
            .flat_map(|l| l.iter().copied().chain([b'\n']))
            .collect()
    }

    #[test]
    fn line_has_every_field_in_spec_order_then_seq_and_hash() {
        let (_, buf) = chain_of(1);
        let line = String::from_utf8(buf).unwrap();
        assert!(line.ends_with("\"}\n") && line.matches('\n').count() == 1);
        let keys = [
            "ts",
            "request_id",
            "task",
            "agent",
            "decision",
            "reason",
            "method",
            "scheme",
            "host",
            "port",
            "path",
            "service",
            "capability",
            "route",
            "risk",
            "credential",
            "status",
            "upstream_ms",
            "bytes_up",
            "bytes_down",
            "client",
            "policy_version",
            "seq",
            "hash",
        ];
        let mut at = 0;
        for key in keys {
            let pos = line[at..]
                .find(&format!("\"{key}\":"))
                .unwrap_or_else(|| panic!("{key} missing or out of order in {line}"));
            at += pos + 1;
        }
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v.as_object().unwrap().len(), keys.len());
        assert_eq!(v["seq"], 1);
        assert_eq!(v["credential"], "github_token");
        assert_eq!(v["upstream_ms"], 12.5);
    }

    #[test]
    fn hash_is_sha256_of_the_line_without_hash_then_the_previous_hash() {
        let (chain, buf) = chain_of(2);
        let lines = lines(&buf);
        let body = |line: &[u8]| [&line[..line.len() - HASH_SUFFIX_LEN], b"}"].concat();
        assert!(body(&lines[0]).ends_with(b",\"seq\":1}"));
        let first = hex_digest(&Sha256::digest(body(&lines[0])).into());
        let second = hex_digest(&Sha256::digest([body(&lines[1]), first.to_vec()].concat()).into());
        assert_eq!(chain.prev, Some(second));
        let text = String::from_utf8(lines[0].clone()).unwrap();
        assert!(text.ends_with(&format!(
            ",\"hash\":\"{}\"}}",
            std::str::from_utf8(&first).unwrap()
        )));
        assert_eq!(verify_chain(Cursor::new(&buf)), Ok(2));
    }

    #[test]
    fn tampering_is_detected_at_the_line() {
        let (_, buf) = chain_of(4);
        assert_eq!(verify_chain(Cursor::new(&buf)), Ok(4));
        let original = lines(&buf);

        let mut altered = original.clone();
        let text = String::from_utf8(altered[1].clone()).unwrap();
        altered[1] = text
            .replace("\"status\":201", "\"status\":403")
            .into_bytes();
        assert_eq!(
            verify_chain(Cursor::new(join(&altered))).unwrap_err().line,
            2
        );

        let mut removed = original.clone();
        removed.remove(2);
        assert_eq!(
            verify_chain(Cursor::new(join(&removed))).unwrap_err().line,
            3
        );

        let mut swapped = original.clone();
        swapped.swap(1, 2);
        assert_eq!(
            verify_chain(Cursor::new(join(&swapped))).unwrap_err().line,
            2
        );

        let truncated_head = original[1..].to_vec();
        assert_eq!(
            verify_chain(Cursor::new(join(&truncated_head)))
                .unwrap_err()
                .line,
            1
        );

        // A record replaced by a line that is not one: the next record does not link.
        let mut replaced = original.clone();
        replaced[1] = b"{\"ts\":\"2026".to_vec();
        assert_eq!(
            verify_chain(Cursor::new(join(&replaced))).unwrap_err().line,
            3
        );
    }

    // A write torn by a crash or a full disk is left in place when keyward starts again and
    // appends after it: the chain is checked across it, and the line is reported.
    #[test]
    fn a_torn_line_is_reported_and_the_chain_checked_across_it() {
        let (_, buf) = chain_of(4);
        let original = lines(&buf);
        let mut torn = original.clone();
        torn.insert(2, b"{\"ts\":\"2026-11-27T1".to_vec());
        let v = verify_whole(Cursor::new(join(&torn))).unwrap();
        assert_eq!((v.records, v.not_records), (4, vec![3]));
        // `verify_chain` (the library's strict check) still refuses it.
        assert_eq!(verify_chain(Cursor::new(join(&torn))).unwrap_err().line, 3);
        // At the end, before any restart.
        let mut tail = join(&original);
        tail.extend_from_slice(b"{\"ts\":\"2026");
        let v = verify_whole(Cursor::new(tail)).unwrap();
        assert_eq!((v.records, v.not_records), (4, vec![5]));
        // A whole record without a valid hash is not a torn write: it fails the file.
        let mut forged = original.clone();
        let fake = String::from_utf8(original[1].clone()).unwrap();
        let fake = fake.rsplit_once(",\"hash\"").unwrap().0.to_string() + "}";
        forged.insert(2, fake.into_bytes());
        assert_eq!(
            verify_whole(Cursor::new(join(&forged))).unwrap_err().line,
            3
        );
        // A cut start followed by a whole forged record on the same line is not a torn write.
        let mut glued = original.clone();
        let glued_line = [b"{\"ts\":\"2026-11".as_slice(), &original[1]].concat();
        glued.insert(2, glued_line);
        assert_eq!(verify_whole(Cursor::new(join(&glued))).unwrap_err().line, 3);
        // Two torn lines in a row are not one torn write; another program's line is not one.
        let mut twice = original.clone();
        twice.insert(1, b"{\"ts\":\"2026-11".to_vec());
        twice.insert(1, b"{\"t".to_vec());
        assert_eq!(verify_chain(Cursor::new(join(&twice))).unwrap_err().line, 3);
        let mut mixed = original.clone();
        mixed.insert(1, b"INFO keyward: policy reloaded".to_vec());
        assert_eq!(verify_chain(Cursor::new(join(&mixed))).unwrap_err().line, 2);
        // The first record must still be seq 1.
        let mut headless = original[1..].to_vec();
        headless.insert(0, b"{\"ts".to_vec());
        assert_eq!(
            verify_chain(Cursor::new(join(&headless))).unwrap_err().line,
            2
        );
    }

    #[test]
    fn a_piece_from_the_middle_verifies_from_its_first_record_on() {
        let (_, buf) = chain_of(6);
        let original = lines(&buf);
        let piece = original[2..].to_vec();
        // As a whole file it is refused with the reason, not as an altered record.
        let err = verify_chain(Cursor::new(join(&piece))).unwrap_err();
        assert_eq!(err.line, 1);
        assert!(err.problem.contains("starts after seq 1"), "{err}");
        let v = verify_chain_from_middle(Cursor::new(join(&piece))).unwrap();
        assert_eq!((v.first_seq, v.records), (3, 4));
        assert_eq!(v.last, verify_whole(Cursor::new(&buf)).unwrap().last);
        // Only the first record is taken on trust: a later one removed or altered still shows.
        let mut gap = piece.clone();
        gap.remove(2);
        assert_eq!(
            verify_chain_from_middle(Cursor::new(join(&gap)))
                .unwrap_err()
                .line,
            3
        );
        let mut mixed = piece.clone();
        mixed.insert(
            1,
            b"2026-11-27T12:00:00Z  INFO keyward: policy reloaded".to_vec(),
        );
        let err = verify_chain_from_middle(Cursor::new(join(&mixed))).unwrap_err();
        assert_eq!(err.line, 2);
        assert!(err.problem.contains("not an audit record"), "{err}");
    }

    #[test]
    fn parse_tail_accepts_only_a_trailing_lowercase_hash() {
        let (chain, buf) = chain_of(2);
        let last = lines(&buf).pop().unwrap();
        assert_eq!(parse_tail(&last), Some(chain));
        let upper = String::from_utf8(last.clone()).unwrap().to_uppercase();
        assert_eq!(parse_tail(upper.as_bytes()), None);
        assert_eq!(parse_tail(br#"{"seq":1,"hash":"00"}"#), None);
        assert_eq!(parse_tail(b"not json"), None);
        // hash not the last member
        let h = "a".repeat(64);
        let moved = format!(r#"{{"hash":"{h}","seq":1,"x":"{}"}}"#, "y".repeat(70));
        assert_eq!(parse_tail(moved.as_bytes()), None);
    }

    fn tail_of(content: &[u8]) -> Result<(Chain, bool), AuditError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        std::fs::write(&path, content).unwrap();
        continue_chain(&mut File::open(&path).unwrap(), &path)
    }

    #[test]
    fn continue_chain_finds_the_last_record() {
        assert_eq!(tail_of(b"").unwrap(), (Chain::default(), false));
        let (chain, buf) = chain_of(3);
        assert_eq!(tail_of(&buf).unwrap(), (chain.clone(), false));

        let mut torn = buf.clone();
        torn.extend_from_slice(b"{\"ts\":\"20");
        assert_eq!(tail_of(&torn).unwrap(), (chain.clone(), true));

        // A torn line terminated by an earlier start, then a crash before any new record.
        torn.push(b'\n');
        assert_eq!(tail_of(&torn).unwrap(), (chain, false));
    }

    #[test]
    fn continue_chain_refuses_a_large_file_that_is_not_an_audit_log() {
        assert_eq!(tail_of(b"hello\n").unwrap(), (Chain::default(), false));
        let junk = b"some other log line\n".repeat(60_000);
        assert!(matches!(
            tail_of(&junk),
            Err(AuditError::NotAnAuditLog { .. })
        ));
    }

    #[test]
    fn continue_chain_reads_only_the_tail_of_a_large_log() {
        let (_, mut buf) = chain_of(1);
        // Grow past the tail window with valid records so the window starts mid-line.
        let mut chain = Chain::default();
        buf.clear();
        let mut i = 0u16;
        while buf.len() < 2 * TAIL_WINDOW as usize {
            chain.append(Encoded::new(&full_record(i % 100)), &mut buf);
            i = i.wrapping_add(1);
        }
        assert_eq!(tail_of(&buf).unwrap(), (chain, false));
    }
}
