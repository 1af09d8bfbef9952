//! Request targets that carry a `#fragment` (SPEC §4.4: refused as ambiguous).
//!
//! The `http` crate cuts a fragment off when it parses a request target, so the parsed request
//! never shows one. `Sniff` therefore watches the bytes an HTTP/1 connection reads, before the
//! parser does, for request lines whose target has a `#`, and notes each in the connection's
//! `FragmentLog`. The connection's service takes the note for the request it belongs to (same
//! method, same target once the fragment is cut) and marks that request with `FragmentInTarget`,
//! which `identify` refuses.
//!
//! The cost on the hot path is a `memchr` for `#` and one for the last line end over the bytes
//! read; only a line that has a `#` is looked at further. Sniffing stops once the connection
//! stops speaking HTTP/1 (a tunnel after CONNECT, a WebSocket after 101).

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use http::{Method, Uri};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Request extension: the request line's target had a fragment.
#[derive(Clone, Copy, Debug)]
pub struct FragmentInTarget;

/// The last this many bytes of a line are kept for sniffing (a request line is the end of its
/// line, see `request_line_note`); a target longer than that is noted without its text, which
/// marks the connection's next request (fail closed).
const MAX_LINE: usize = 16 * 1024;
/// Notes waiting for their request. Lines in bodies that look like request lines with a `#`
/// never find theirs; past this many the connection cannot tell which note is whose, so every
/// later request on it is refused (dropping notes instead would let a body push its own
/// request's note out).
const MAX_NOTES: usize = 64;

/// Request lines with a fragment, seen on one connection and not yet matched to a request.
#[derive(Default)]
pub struct FragmentLog {
    pending: AtomicUsize,
    stopped: AtomicBool,
    /// More than `MAX_NOTES` were waiting: fail closed for the rest of the connection.
    overflowed: AtomicBool,
    notes: Mutex<VecDeque<Note>>,
    /// The connection's bytes were not the protocol it must speak (ALPN's, or HTTP/1 on the
    /// plain listener), which ended it.
    other_protocol: AtomicBool,
}

struct Note {
    /// The method token, possibly with body bytes glued before it (`abcGET`): a request's
    /// method matches when it ends this token. `None` when it was not kept.
    method: Option<Box<[u8]>>,
    /// The target before the `#`; `None` when the line was too long to keep.
    target: Option<Box<[u8]>>,
}

impl FragmentLog {
    /// Whether the request line of (`method`, `uri`) had a fragment; takes the note.
    pub fn take(&self, method: &Method, uri: &Uri) -> bool {
        if self.pending.load(Ordering::Acquire) == 0 {
            return false;
        }
        if self.overflowed.load(Ordering::Acquire) {
            return true;
        }
        let Ok(mut notes) = self.notes.lock() else {
            return true; // poisoned: cannot tell, so refuse
        };
        let found = notes.iter().position(|n| {
            n.method
                .as_deref()
                .map_or(true, |m| m.ends_with(method.as_str().as_bytes()))
                && n.target.as_deref().map_or(true, |t| same_target(t, uri))
        });
        match found {
            Some(i) => {
                notes.remove(i);
                self.pending.store(notes.len(), Ordering::Release);
                true
            }
            None => false,
        }
    }

    /// The connection no longer speaks HTTP/1 (tunnel, WebSocket): stop looking at its bytes.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Release);
    }

    /// Whether the connection ended because its bytes were not the protocol it must speak.
    pub fn saw_other_protocol(&self) -> bool {
        self.other_protocol.load(Ordering::Acquire)
    }

    fn note(&self, note: Note) {
        if let Ok(mut notes) = self.notes.lock() {
            if notes.len() == MAX_NOTES {
                self.overflowed.store(true, Ordering::Release);
                return;
            }
            notes.push_back(note);
            self.pending.store(notes.len(), Ordering::Release);
        }
    }
}

/// Whether `raw` (a target with its fragment cut off) parses to the request's URI.
fn same_target(raw: &[u8], uri: &Uri) -> bool {
    Uri::try_from(raw).is_ok_and(|u| u == *uri)
}

pin_project_lite::pin_project! {
    /// A connection's byte stream, read through so request lines with a fragment are noted.
    pub struct Sniff<I> {
        #[pin]
        inner: I,
        log: Arc<FragmentLog>,
        line: Line,
        protocol: Protocol,
    }
}

/// What the first bytes of a connection must be: the protocol ALPN chose in a tunnel, HTTP/1
/// on the plain listener. The fragment sniffing (and the agent's expectations) follow it, and
/// the parser would answer half a preface as a bad HTTP/1 request, so a connection whose bytes
/// say otherwise ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Protocol {
    /// Anything (what follows the first bytes once they are not the HTTP/2 preface).
    Any,
    /// HTTP/2 (`true`) or HTTP/1, `usize` bytes of the preface checked so far.
    Must(bool, usize),
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The length of the preface's `PRI * HTTP/2.0`.
const H2_REQUEST_LINE: usize = 14;

impl<I> Sniff<I> {
    /// The plain listener's connections, which speak HTTP/1 (the HTTP/2 preface ends them,
    /// from its request line on, however it arrives).
    pub fn new(inner: I, log: Arc<FragmentLog>) -> Sniff<I> {
        Sniff {
            inner,
            log,
            line: Line::default(),
            protocol: Protocol::Must(false, 0),
        }
    }

    /// The same for an intercepted connection whose ALPN chose HTTP/2 (`h2`) or HTTP/1.
    pub fn for_alpn(inner: I, log: Arc<FragmentLog>, h2: bool) -> Sniff<I> {
        Sniff {
            protocol: Protocol::Must(h2, 0),
            ..Sniff::new(inner, log)
        }
    }
}

impl Protocol {
    /// Checks the next bytes read; an error when they are not the chosen protocol's.
    fn check(&mut self, new: &[u8]) -> io::Result<()> {
        let Protocol::Must(h2, seen) = *self else {
            return Ok(());
        };
        let rest = &H2_PREFACE[seen..];
        let n = rest.len().min(new.len());
        let matches = rest[..n] == new[..n];
        *self = match (h2, matches) {
            (true, false) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "ALPN chose h2 but the client spoke something else",
                ))
            }
            // No HTTP/1 request begins with the preface's request line: HTTP/1 ends there
            // (hyper would answer it 400 once the line is in, before the rest came).
            (false, true) if seen + n >= H2_REQUEST_LINE => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "HTTP/1.1 was expected but the client sent the HTTP/2 preface",
                ))
            }
            (false, false) => Protocol::Any,
            _ if seen + n == H2_PREFACE.len() => Protocol::Any,
            _ => Protocol::Must(h2, seen + n),
        };
        Ok(())
    }
}

impl<I: AsyncRead> AsyncRead for Sniff<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let polled = this.inner.poll_read(cx, buf);
        if *this.protocol != Protocol::Any {
            if let Some(new) = buf.filled().get(before..) {
                if let Err(e) = this.protocol.check(new) {
                    this.log.other_protocol.store(true, Ordering::Release);
                    return Poll::Ready(Err(e));
                }
            }
        }
        if !this.log.stopped.load(Ordering::Acquire) {
            if let Some(new) = buf.filled().get(before..) {
                this.line.observe(this.log, new);
            }
        }
        polled
    }
}

/// The line being read: its last `MAX_LINE` bytes, its full length, and whether it has a `#`.
#[derive(Default)]
struct Line {
    bytes: Vec<u8>,
    len: usize,
    hash: bool,
}

impl Line {
    fn extend(&mut self, bytes: &[u8]) {
        self.len = self.len.saturating_add(bytes.len());
        self.hash = self.hash || memchr::memchr(b'#', bytes).is_some();
        let tail = bytes
            .get(bytes.len().saturating_sub(MAX_LINE)..)
            .unwrap_or(bytes);
        let over = (self.bytes.len() + tail.len()).saturating_sub(MAX_LINE);
        self.bytes.drain(..over.min(self.bytes.len()));
        self.bytes.extend_from_slice(tail);
    }

    fn clear(&mut self) {
        if self.bytes.capacity() > 4096 {
            // A long line (a body without newlines) passed: give its buffer back.
            self.bytes = Vec::new();
        }
        self.bytes.clear();
        self.len = 0;
        self.hash = false;
    }

    /// Feeds newly read bytes through; notes each finished request line with a fragment.
    fn observe(&mut self, log: &FragmentLog, new: &[u8]) {
        if !self.hash && memchr::memchr(b'#', new).is_none() {
            // Common case: nothing to look at; keep only the tail of the last line.
            if let Some(i) = memchr::memrchr(b'\n', new) {
                self.clear();
                self.extend(new.get(i + 1..).unwrap_or_default());
            } else {
                self.extend(new);
            }
            return;
        }
        let mut rest = new;
        while let Some(i) = memchr::memchr(b'\n', rest) {
            let (head, tail) = rest.split_at(i + 1);
            self.extend(head);
            if self.hash {
                let truncated = self.len > self.bytes.len();
                if let Some(note) = request_line_note(&self.bytes, truncated) {
                    log.note(note);
                }
            }
            self.clear();
            rest = tail;
        }
        self.extend(rest);
    }
}

/// If `line` ends in an HTTP/1 request line whose target has a `#`, the note for it.
///
/// A request line is read from the end of its line: the parser starts the next request where
/// the previous body ended, so body bytes without a final newline come before it on the same
/// line (`...}GET /x#y HTTP/1.1`). `truncated`: the line's start was not kept.
fn request_line_note(line: &[u8], truncated: bool) -> Option<Note> {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let (rest, version) = line.split_at(memchr::memrchr(b' ', line)?);
    let is_http1 = version.len() == 9
        && version.starts_with(b" HTTP/1.")
        && version.last().is_some_and(u8::is_ascii_digit);
    if !is_http1 {
        return None;
    }
    let Some(space) = memchr::memrchr(b' ', rest) else {
        // The target runs past what was kept; whether its `#` is in it cannot be told, so the
        // connection's next request is refused (fail closed).
        return truncated.then_some(Note {
            method: None,
            target: None,
        });
    };
    let (before, target) = rest.split_at(space);
    let target = target.get(1..)?;
    let hash = memchr::memchr(b'#', target)?;
    // The method is the run of token characters right before the target; when that run
    // reaches back to where the kept bytes begin, its start may be cut: any method matches.
    let run = before.iter().rev().take_while(|&&b| is_tchar(b)).count();
    let method = match before.get(before.len() - run..)? {
        _ if truncated && run == before.len() => None,
        [] => return None,
        m => Some(m.into()),
    };
    Some(Note {
        method,
        target: Some(target.get(..hash)?.into()),
    })
}

/// RFC 9110 token characters (a method is a token).
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

impl<I: AsyncWrite> AsyncWrite for Sniff<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of an intercepted connection, however split, must be the protocol ALPN chose.
    #[test]
    fn an_intercepted_connection_speaks_what_alpn_chose() {
        let run = |h2: bool, chunks: &[&[u8]]| {
            let mut p = Protocol::Must(h2, 0);
            chunks.iter().try_for_each(|c| p.check(c)).is_ok()
        };
        let (pri, rest) = H2_PREFACE.split_at(5);
        assert!(run(true, &[H2_PREFACE, b"\0\0\x12\x04"]));
        assert!(run(true, &[pri, rest, b"frames"]));
        assert!(!run(true, &[b"GET / HTTP/1.1\r\n"]));
        assert!(!run(true, &[pri, b"GET"]));
        assert!(run(false, &[b"GET / HTTP/1.1\r\n", H2_PREFACE]));
        assert!(
            run(false, &[pri, b" GET"]),
            "a prefix of the preface, then not"
        );
        assert!(!run(false, &[H2_PREFACE]));
        assert!(!run(false, &[pri, rest]));
    }

    fn fed(chunks: &[&[u8]]) -> FragmentLog {
        let log = FragmentLog::default();
        let mut line = Line::default();
        for c in chunks {
            line.observe(&log, c);
        }
        log
    }

    fn req(method: &str, target: &str) -> (Method, Uri) {
        (method.parse().unwrap(), target.parse().unwrap())
    }

    #[test]
    fn a_fragment_in_an_origin_form_target_marks_its_request_once() {
        let log = fed(&[b"GET /v1/a?x=1#frag HTTP/1.1\r\nHost: h\r\n\r\n"]);
        let (m, u) = req("GET", "/v1/a?x=1");
        assert!(log.take(&m, &u));
        assert!(!log.take(&m, &u), "the note is taken by its request");
    }

    #[test]
    fn a_request_line_split_across_reads_is_still_seen() {
        let log = fed(&[
            b"GET /v1/a",
            b"#f",
            b"rag HTT",
            b"P/1.1\r",
            b"\nHost: h\r\n\r\n",
        ]);
        let (m, u) = req("GET", "/v1/a");
        assert!(log.take(&m, &u));
    }

    #[test]
    fn absolute_form_targets_match_the_parsed_uri() {
        let log = fed(&[b"POST http://api.example.com/v1/x#/../admin HTTP/1.1\r\n\r\n"]);
        let (m, u) = req("POST", "http://api.example.com/v1/x");
        assert!(log.take(&m, &u));
    }

    #[test]
    fn another_request_does_not_take_the_note() {
        let log = fed(&[b"GET /a#x HTTP/1.1\r\n\r\n"]);
        let (m, u) = req("GET", "/b");
        assert!(!log.take(&m, &u));
        let (m, u) = req("POST", "/a");
        assert!(!log.take(&m, &u));
        let (m, u) = req("GET", "/a");
        assert!(log.take(&m, &u));
    }

    #[test]
    fn hashes_outside_request_lines_are_ignored() {
        let log = fed(&[
            b"GET /a HTTP/1.1\r\nX-Tag: #1\r\nHost: h\r\n\r\n",
            b"{\"color\": \"#fff\"}\n# a comment line HTTP/1.1\n",
        ]);
        assert_eq!(log.pending.load(Ordering::Acquire), 0);
    }

    #[test]
    fn a_request_line_glued_to_a_body_without_a_final_newline_is_seen() {
        // `abc` is the previous request's body (Content-Length: 3): the parser starts the next
        // request right after it, on the same line.
        let log = fed(&[
            b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
            b"GET /glued#y HTTP/1.1\r\nHost: h\r\n\r\n",
        ]);
        let (m, u) = req("GET", "/glued");
        assert!(log.take(&m, &u));
        let log = fed(&[b"{\"a\":1}DELETE /x/1#f HTTP/1.1\r\n\r\n"]);
        let (m, u) = req("DELETE", "/x/1");
        assert!(log.take(&m, &u));
    }

    #[test]
    fn an_overlong_target_with_a_hash_marks_the_next_request() {
        let mut long = b"GET /".to_vec();
        long.extend(vec![b'a'; MAX_LINE]);
        long.extend_from_slice(b"#x HTTP/1.1\r\n\r\n");
        let log = fed(&[&long]);
        let (m, u) = req("GET", "/whatever");
        assert!(log.take(&m, &u));
    }

    #[test]
    fn an_overlong_text_line_with_a_hash_is_not_a_request_line() {
        let mut long = b"GET the words ".to_vec();
        long.extend(vec![b'a'; MAX_LINE]);
        long.extend_from_slice(b" #tag\n");
        let log = fed(&[&long]);
        assert_eq!(log.pending.load(Ordering::Acquire), 0);
    }

    #[test]
    fn past_the_bound_every_request_is_refused() {
        // A request with a fragment whose own body holds many more such lines: its note must
        // not be pushed out (that let it through), so the connection fails closed.
        let mut bytes = b"POST /evict#frag HTTP/1.1\r\nContent-Length: 9999\r\n\r\n".to_vec();
        for i in 0..MAX_NOTES + 5 {
            bytes.extend_from_slice(format!("GET /z{i}#x HTTP/1.1\n").as_bytes());
        }
        let log = fed(&[&bytes]);
        assert_eq!(log.pending.load(Ordering::Acquire), MAX_NOTES);
        let (m, u) = req("POST", "/evict");
        assert!(log.take(&m, &u));
        let (m, u) = req("GET", "/anything");
        assert!(
            log.take(&m, &u),
            "after an overflow every request is refused"
        );
    }

    #[test]
    fn a_line_just_over_the_kept_length_still_marks_its_request() {
        // The kept part ends inside or after the target: the line is still a request line.
        for pad in [
            MAX_LINE - 40,
            MAX_LINE - 20,
            MAX_LINE - 10,
            MAX_LINE - 5,
            MAX_LINE,
        ] {
            let mut line = b"GET http://a.test/LONG?q=".to_vec();
            line.extend(vec![b'a'; pad]);
            line.extend_from_slice(b"#frag HTTP/1.1\r\nHost: a.test\r\n\r\n");
            let log = fed(&[&line]);
            let target = format!("http://a.test/LONG?q={}", "a".repeat(pad));
            let (m, u) = req("GET", &target);
            assert!(log.take(&m, &u), "pad {pad}");
        }
    }

    #[test]
    fn a_stopped_log_is_not_fed() {
        let log = Arc::new(FragmentLog::default());
        log.stop();
        let mut sniff = Sniff::new(&b"GET /a#x HTTP/1.1\r\n\r\n"[..], log.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut out = Vec::new();
        rt.block_on(tokio::io::AsyncReadExt::read_to_end(&mut sniff, &mut out))
            .unwrap();
        let (m, u) = req("GET", "/a");
        assert!(!log.take(&m, &u));
    }
}
