//! Redaction of reflected credentials in responses (I4): an upstream that echoes the injected
//! credential (in a header, an error message, a debug endpoint) must not hand it to the agent.
//!
//! The credential is looked for in each of its spellings (raw, base64, percent-, form- and
//! JSON-encoded, UTF-16), whole or cut short at either end (`replace_all`); each occurrence
//! is replaced by `[redacted]` and counted. Bodies are scanned as they stream, with a carry of
//! the longest needle minus one byte (more only while a cut occurrence found at a frame's end
//! may go on: at most twice the longest needle) so an occurrence split across frames is still
//! found: whatever the framing and however long the upstream pauses, the carry goes out only
//! with the next frame or at the end, except what precedes a break in it: a byte no spelling
//! of the credential holds (`credentials::Breaks`: for a printable-ASCII value, a line break,
//! another control byte or a byte of 0x80 or more). Never logs what it finds.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use zeroize::Zeroizing;

use crate::credentials::{basic_pair, gate_of, keys_of, Breaks, CredentialValue, GATE_BYTES};
use crate::policy::Injection;

const MARK: &[u8] = b"[redacted]";

/// Haystacks shorter than this are searched without building a `memmem::Finder` (its set-up
/// costs more than a `memchr` walk over a header value or a small body).
const SMALL_HAY: usize = 1024;

/// Haystacks shorter than this (header values) are first looked through for a key's first
/// four bytes in one pass (`CredentialValue::may_begin_in`); longer ones are searched at once,
/// as a search per key (`memchr` of its first byte) costs less than the pass over them.
const FILTERED_HAY: usize = 128;

/// The byte strings that must not reach the agent, and a streaming scanner over them.
pub struct Redactor {
    /// The credential's reflections (derived once per value, see `CredentialValue`).
    value: Arc<CredentialValue>,
    /// An injected form that is not derived from the value alone (a Basic pair), and its
    /// keys' gates.
    extra: Option<Zeroizing<Vec<u8>>>,
    extra_gates: [Option<u8>; 2],
    /// The first four bytes of its keys (`may_begin_in`).
    extra_starts: Zeroizing<[[u8; 4]; 2]>,
    longest: usize,
    carry: BytesMut,
    found: u64,
    /// The bytes no needle holds (`CredentialValue::breaks`), so that the bytes up to one can
    /// go out at once.
    breaks: Breaks,
}

impl Redactor {
    /// Needles for one credential: raw, base64 (standard and URL-safe), percent-encoded.
    /// `extra` adds an injected form that is not the raw secret (e.g. a Basic auth value).
    pub fn new(value: Arc<CredentialValue>, extra: Option<Zeroizing<Vec<u8>>>) -> Redactor {
        let extra = extra.filter(|e| {
            e.len() >= 4
                && !value
                    .reflections()
                    .iter()
                    .any(|r| r.as_slice() == e.as_slice())
        });
        let key_len = value.key_len();
        let mut r = Redactor {
            value,
            extra_gates: extra
                .as_deref()
                .map_or([None; 2], |e| keys_of(e, key_len).map(gate_of)),
            extra_starts: Zeroizing::new(extra.as_deref().map_or([[0; 4]; 2], |e| {
                keys_of(e, key_len).map(|k| {
                    let mut start = [0; 4];
                    start.copy_from_slice(k.get(..4).unwrap_or(&[0; 4]));
                    start
                })
            })),
            extra,
            longest: 0,
            carry: BytesMut::new(),
            found: 0,
            breaks: Breaks::None,
        };
        r.longest = r.needles().map(|(n, _)| n.len()).max().unwrap_or(0);
        // (Looked up once per value, not per request: the reflections are many. The injected
        // form, a Basic pair's base64, is printable ASCII, but is checked all the same.)
        let breaks = r.value.breaks();
        let extra_holds_breaks = r
            .extra
            .as_deref()
            .is_some_and(|e| e.iter().any(|&b| breaks.is_break(b)));
        r.breaks = if extra_holds_breaks {
            Breaks::None
        } else {
            breaks
        };
        r
    }

    /// The redactor for a credential injected as `injection` describes.
    pub fn for_injection(injection: &Injection, value: Arc<CredentialValue>) -> Redactor {
        match injection {
            Injection::Basic { username, .. } => {
                let pair = basic_pair(username, value.secret());
                let extra = Zeroizing::new(pair.trim_end_matches('=').as_bytes().to_vec());
                Redactor::new(value, Some(extra))
            }
            Injection::Header { .. } | Injection::Query { .. } => Redactor::new(value, None),
        }
    }

    /// Each needle with its keys' gates (`credentials::gate_of`): the injected form (a Basic
    /// pair), then the value's reflections.
    fn needles(&self) -> impl Iterator<Item = (&[u8], [Option<u8>; 2])> {
        let extra = self.extra.iter().map(|e| (e.as_slice(), self.extra_gates));
        let reflections = self
            .value
            .reflections()
            .iter()
            .map(|r| r.as_slice())
            .zip(self.value.reflection_gates().iter().copied());
        extra.chain(reflections)
    }

    /// Whether an occurrence may begin in `hay`: for a short one (a header value), a pass over
    /// its 4-byte windows (`CredentialValue::may_begin_in`) spares a search per key.
    fn may_begin_in(&self, hay: &[u8]) -> bool {
        hay.len() >= FILTERED_HAY
            || self.value.may_begin_in(hay)
            || (self.extra.is_some()
                && hay
                    .windows(4)
                    .any(|w| self.extra_starts.iter().any(|s| w == s)))
    }

    /// Occurrences replaced so far.
    pub fn found(&self) -> u64 {
        self.found
    }

    /// Replaces occurrences in every header value, and drops headers whose name carries one
    /// (a name cannot hold the marker); returns how many were replaced or dropped.
    pub fn headers(&mut self, headers: &mut HeaderMap) -> u64 {
        let before = self.found;
        let leaked: Vec<http::HeaderName> = headers
            .keys()
            .filter(|name| {
                let name = name.as_str().as_bytes();
                // (A name is lowercase on the way: any key, in any case, cut or whole.)
                let may = self.extra.is_some() || self.value.may_begin_in_folded(name);
                may && self
                    .needles()
                    .flat_map(|(n, _)| keys_of(n, self.value.key_len()))
                    .any(|key| {
                        name.len() >= key.len()
                            && name.windows(key.len()).any(|w| w.eq_ignore_ascii_case(key))
                    })
            })
            .cloned()
            .collect();
        for name in leaked {
            headers.remove(&name);
            self.found += 1;
        }
        for value in headers.values_mut() {
            if let Some(Replaced { out, count: n, .. }) = self.replace_all(value.as_bytes(), true) {
                self.found += n;
                *value = http::HeaderValue::from_bytes(&out)
                    .unwrap_or(http::HeaderValue::from_static("[redacted]"));
            }
        }
        self.found - before
    }

    /// Feeds a body frame; returns the bytes that are safe to send now, in order: those held
    /// back from before, then the frame's own.
    ///
    /// SECURITY: what is held back depends only on lengths and breaks — the stream's last
    /// `longest - 1` bytes, less those up to the last break among them (a byte no spelling
    /// of the value's class holds) — never on whether they could begin a credential (a key
    /// already found is another matter: see `replace_all`). Holding back only a tail that may
    /// begin one told the agent, by the delay, which of its guesses (echoed by a streaming
    /// upstream) were prefixes of the credential: a whole key was recovered that way a
    /// character at a time. Nor is the tail ever let go before the next frame or the end (it once went out
    /// after a 50 ms pause, and an agent that placed the credential across the upstream's
    /// pause got it whole). No occurrence can span a break, so a stream's events (SSE,
    /// NDJSON: a line break) and binary messages (gRPC: a length prefix, protobuf tags) go
    /// out at once, all but a run of printable text at their very end.
    pub fn push(&mut self, chunk: Bytes) -> [Bytes; 2] {
        let hold = self.longest.saturating_sub(1);
        if hold == 0 {
            return [Bytes::new(), chunk];
        }
        // The common case — no needle in the frame nor across its start — hands the frame on
        // without copying it (a large download is not copied three times over): the held
        // bytes go first, the frame's last `hold` bytes are held.
        if chunk.len() >= hold && !self.contains_any(&chunk) && !self.across_start(&chunk) {
            let released = std::mem::take(&mut self.carry).freeze();
            let mut safe = chunk;
            let held = safe.split_off(self.held_from(&safe, hold));
            self.carry.extend_from_slice(&held);
            return [released, safe];
        }
        self.carry.extend_from_slice(&chunk);
        let (mut out, open) = match self.replace_all(&self.carry, false) {
            Some(r) => {
                self.found += r.count;
                self.carry.clear();
                (BytesMut::from(&r.out[..]), r.open_from)
            }
            None => (std::mem::take(&mut self.carry), None),
        };
        // An occurrence the next frame may go on with is held whole, breaks or not, with what
        // overlaps it (at most twice the longest needle: see `replace_all`).
        let from = self.held_from(&out, hold).min(open.unwrap_or(usize::MAX));
        self.carry = out.split_off(from);
        [Bytes::new(), out.freeze()]
    }

    /// Where the held tail of `out` (already searched) starts: its last `hold` bytes, less
    /// those up to the last break among them. An occurrence that the next frame could
    /// complete holds no break, so it starts after the last one.
    fn held_from(&self, out: &[u8], hold: usize) -> usize {
        let start = out.len().saturating_sub(hold);
        let tail = out.get(start..).unwrap_or_default();
        let last = match self.breaks {
            Breaks::NotPrintable => tail.iter().rposition(|&b| self.breaks.is_break(b)),
            Breaks::LineBreaks => memchr::memrchr2(b'\n', b'\r', tail),
            Breaks::None => None,
        };
        last.map_or(start, |i| start + i + 1)
    }

    /// Whether the held bytes and the start of `chunk` hold a needle between them (the held
    /// bytes are shorter than any needle, so one that starts there ends in `chunk`'s first
    /// `longest - 1` bytes).
    fn across_start(&self, chunk: &[u8]) -> bool {
        if self.carry.is_empty() {
            return false;
        }
        let mut joint = Zeroizing::new(Vec::with_capacity(2 * self.longest));
        joint.extend_from_slice(&self.carry);
        joint.extend_from_slice(chunk.get(..self.longest - 1).unwrap_or(chunk));
        self.contains_any(&joint)
    }

    /// `text` with every spelling of the credential replaced: for what keyward logs about an
    /// upstream (its error text can carry what the upstream chose to echo).
    pub fn scrub(&self, text: &str) -> String {
        match self.replace_all(text.as_bytes(), true) {
            Some(Replaced { out, .. }) => String::from_utf8_lossy(&out).into_owned(),
            None => text.to_owned(),
        }
    }

    /// `hay`, a piece that is complete in itself (a WebSocket control frame's payload), with
    /// every occurrence replaced and counted; `None` when it holds none.
    pub fn whole(&mut self, hay: &[u8]) -> Option<Zeroizing<Vec<u8>>> {
        let r = self.replace_all(hay, true)?;
        self.found += r.count;
        Some(r.out)
    }

    /// Whether bytes are held back (until the next frame or the end).
    #[cfg(test)]
    fn holds(&self) -> bool {
        !self.carry.is_empty()
    }

    fn contains_any(&self, hay: &[u8]) -> bool {
        if !self.may_begin_in(hay) {
            return false;
        }
        let mut gates = Gates::default();
        self.needles().any(|(n, key_gates)| {
            keys_of(n, self.value.key_len())
                .iter()
                .zip(key_gates)
                .any(|(key, gate)| {
                    key.len() <= hay.len() && gates.may_hold(hay, gate) && find(hay, key).is_some()
                })
        })
    }

    /// The bytes held back, at the end of the body (or of a WebSocket message), with a spelling
    /// cut short at the very end replaced too: nothing more can complete it.
    pub fn finish(&mut self) -> Bytes {
        let carry = std::mem::take(&mut self.carry);
        match self.replace_all(&carry, true) {
            Some(r) => {
                self.found += r.count;
                Bytes::copy_from_slice(&r.out)
            }
            None => carry.freeze(),
        }
    }

    /// `hay` with every occurrence of every needle replaced by the marker; `None` (nothing
    /// copied) when there is none. Copies that held a needle wipe themselves.
    ///
    /// An occurrence is found by either of a needle's keys (`credentials::keys_of`: a third of
    /// the value's length at each end of the spelling), so a reflection cut short at either
    /// end is found too:
    /// - a whole needle is replaced exactly;
    /// - a cut one is replaced for the needle's whole length on from its head (or back from its
    ///   tail), whatever those bytes are, up to a break (a byte no spelling holds, so the cut
    ///   reflection cannot go on past it): never as far as the match went, which an upstream
    ///   that echoes the agent's own text would tell it a character at a time.
    ///
    /// A cut occurrence whose key lies in a whole one is that one, read by a longer spelling
    /// that shares its first or last bytes: a whole reflection is replaced exactly, not with
    /// the bytes around it. (The price: an upstream that echoes a cut copy of the credential
    /// run on into the agent's own text shows, by the marker's width, whether the agent's
    /// text completed the credential, when a longer spelling shares its start.) Occurrences
    /// that overlap become one marker. Unless `at_end`, a cut one that may go on
    /// past the end of `hay` is not replaced yet: `open_from` says where it starts in the
    /// output, for the caller to hold it back whole until the next frame (or the end).
    fn replace_all(&self, hay: &[u8], at_end: bool) -> Option<Replaced> {
        if !self.may_begin_in(hay) {
            return None;
        }
        let breaks = self.breaks;
        let is_break = |b: &u8| breaks.is_break(*b);
        let mut whole: smallvec::SmallVec<[Span; 4]> = smallvec::SmallVec::new();
        // With where its key was.
        let mut cut: smallvec::SmallVec<[(Span, usize); 4]> = smallvec::SmallVec::new();
        let mut gates = Gates::default();
        for (needle, key_gates) in self.needles() {
            let [head, tail] = keys_of(needle, self.value.key_len());
            // Length first: most header values are shorter than most keys.
            if head.len() > hay.len() {
                continue;
            }
            if gates.may_hold(hay, key_gates[0]) && find(hay, head).is_some() {
                for at in memchr::memmem::find_iter(hay, head) {
                    let rest = hay.get(at..).unwrap_or_default();
                    if rest.starts_with(needle) {
                        whole.push(Span::new(at, at + needle.len(), false));
                        continue;
                    }
                    let reach = rest.get(head.len()..).unwrap_or_default();
                    let span = needle.len() - head.len();
                    // Unless `at_end`, a span that ends less than a key from the end of `hay`
                    // stays open too: what it would take at its end may begin another
                    // occurrence, whose key the next frame completes (replaced now, that
                    // one's rest would come through keyless).
                    let near_end = !at_end && at + needle.len() + head.len() > hay.len() + 1;
                    let found = match reach.iter().take(span).position(is_break) {
                        Some(b) => Span::new(at, at + head.len() + b, false),
                        None if near_end => Span::new(at, hay.len(), true),
                        None => Span::new(at, (at + needle.len()).min(hay.len()), false),
                    };
                    cut.push((found, at));
                }
            }
            if tail.len() < needle.len()
                && gates.may_hold(hay, key_gates[1])
                && find(hay, tail).is_some()
            {
                for at in memchr::memmem::find_iter(hay, tail) {
                    let end = at + tail.len();
                    let before = hay.get(..at).unwrap_or_default();
                    if hay.get(..end).unwrap_or_default().ends_with(needle) {
                        continue; // (found whole by its head)
                    }
                    let span = needle.len() - tail.len();
                    let from = before.len().saturating_sub(span);
                    let start = match before
                        .get(from..)
                        .unwrap_or_default()
                        .iter()
                        .rposition(is_break)
                    {
                        Some(b) => from + b + 1,
                        None => from,
                    };
                    cut.push((Span::new(start, end, false), at));
                }
            }
        }
        cut.retain(|(_, key_at)| !whole.iter().any(|w| w.start <= *key_at && *key_at < w.end));
        if whole.is_empty() && cut.is_empty() {
            return None;
        }
        let mut spans = whole;
        spans.extend(cut.into_iter().map(|(span, _)| span));
        spans.sort_unstable_by_key(|s| (s.start, s.end));
        let mut out = Zeroizing::new(Vec::with_capacity(hay.len()));
        let (mut last, mut count, mut open_from) = (0, 0, None);
        // Overlapping spans merge; one that holds an open span reaches the end of `hay`, and is
        // held from its start. Not from further back than twice the longest needle, though: a
        // chain of overlapping cut occurrences (a line of masked tokens) would otherwise hold,
        // and rescan, the whole line. Then what precedes the open span's own start (less than
        // a needle from the end) is replaced.
        let first_open = spans.iter().filter(|s| s.open).map(|s| s.start).min();
        let hold_limit = hay.len().saturating_sub(2 * self.longest);
        let mut spans = spans.into_iter().peekable();
        while let Some(mut span) = spans.next() {
            while let Some(next) = spans.next_if(|next| next.start < span.end) {
                span.end = span.end.max(next.end);
                span.open |= next.open;
            }
            out.extend_from_slice(hay.get(last..span.start).unwrap_or_default());
            if span.open {
                let held = match first_open {
                    Some(at) if span.start < hold_limit && at > span.start => {
                        out.extend_from_slice(MARK);
                        count += 1;
                        at
                    }
                    _ => span.start,
                };
                open_from = Some(out.len());
                last = held;
                break;
            }
            out.extend_from_slice(MARK);
            last = span.end;
            count += 1;
        }
        out.extend_from_slice(hay.get(last..).unwrap_or_default());
        Some(Replaced {
            out,
            count,
            open_from,
        })
    }
}

/// Bytes of a text an occurrence covers; `open` when the next frame may take it further.
#[derive(Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    open: bool,
}

impl Span {
    fn new(start: usize, end: usize, open: bool) -> Span {
        Span { start, end, open }
    }
}

/// What `Redactor::replace_all` made of a text.
struct Replaced {
    out: Zeroizing<Vec<u8>>,
    /// Occurrences replaced.
    count: u64,
    /// Where in `out` an occurrence starts that the next frame may go on with (not replaced).
    open_from: Option<usize>,
}

/// Which gate bytes (`credentials::GATE_BYTES`) one haystack holds, looked up once each: a
/// needle with a gate byte the haystack lacks cannot be in it. (memmem's own prefilter ranks
/// these bytes common and scans for the needle's letters, which the text is full of.)
#[derive(Default)]
struct Gates([Option<bool>; 3]);

impl Gates {
    /// Whether `hay` may hold a needle whose gate is `gate`.
    fn may_hold(&mut self, hay: &[u8], gate: Option<u8>) -> bool {
        let Some(i) = gate.map(usize::from) else {
            return true;
        };
        match (self.0.get_mut(i), GATE_BYTES.get(i)) {
            (Some(seen), Some(&byte)) => {
                *seen.get_or_insert_with(|| memchr::memchr(byte, hay).is_some())
            }
            _ => true,
        }
    }
}

/// The first occurrence of `needle` (not empty) in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    if hay.len() < needle.len() {
        return None;
    }
    if hay.len() >= SMALL_HAY {
        return memchr::memmem::find(hay, needle);
    }
    let starts = &hay[..=hay.len() - needle.len()];
    memchr::memchr_iter(first, starts).find(|&at| hay[at..].starts_with(needle))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::secret::Secret;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;

    /// Everything a frame releases, in order.
    fn push(r: &mut Redactor, frame: &[u8]) -> Vec<u8> {
        r.push(Bytes::copy_from_slice(frame)).concat()
    }

    fn redactor() -> Redactor {
        let value = CredentialValue::new(Secret::new("sk-live-0123456789".into()));
        Redactor::new(Arc::new(value), None)
    }

    #[test]
    fn scrub_removes_the_credential_from_text_keyward_logs() {
        let r = redactor();
        let text = "http2 error: connection error received: (b\"echo sk-live-0123456789\")";
        let scrubbed = r.scrub(text);
        assert!(!scrubbed.contains("sk-live-0123456789"), "{scrubbed}");
        assert!(scrubbed.contains("echo [redacted]"), "{scrubbed}");
        assert_eq!(r.scrub("connection refused"), "connection refused");
    }

    #[test]
    fn replaces_raw_base64_and_percent_encoded_forms() {
        let mut r = redactor();
        let b64 = STANDARD.encode("sk-live-0123456789");
        let body = format!("a sk-live-0123456789 b {b64} c sk-live-0123456789");
        let mut out = push(&mut r, body.as_bytes());
        out.extend_from_slice(&r.finish());
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("sk-live"));
        assert!(!text.contains(b64.trim_end_matches('=')));
        assert_eq!(r.found(), 3);
        assert!(text.starts_with("a [redacted] b [redacted]"));
    }

    #[test]
    fn finds_a_secret_split_across_frames() {
        for split in 1..18 {
            let mut r = redactor();
            let body = b"xxsk-live-0123456789yy";
            let mut out = push(&mut r, &body[..split]);
            out.extend_from_slice(&push(&mut r, &body[split..]));
            out.extend_from_slice(&r.finish());
            assert_eq!(out, b"xx[redacted]yy", "split at {split}");
        }
    }

    #[test]
    fn headers_are_redacted() {
        let mut r = redactor();
        let mut h = HeaderMap::new();
        h.insert("x-echo", "Bearer sk-live-0123456789".parse().unwrap());
        h.insert("x-other", "fine".parse().unwrap());
        assert_eq!(r.headers(&mut h), 1);
        assert_eq!(h["x-echo"], "Bearer [redacted]");
        assert_eq!(h["x-other"], "fine");
    }

    /// SECURITY: an upstream that echoes the first (or last) N bytes of what it got hands over
    /// a credential cut short; with N chosen one short of its end, the agent would need to
    /// guess one character (and `secret_egress` tells a right guess). A reflection cut at
    /// either end, or at both (an ellipsis), is replaced if it keeps a third of the credential
    /// at one end, in a body (at its end or inside it, up to a line break) and in a header.
    #[test]
    fn a_reflection_cut_short_at_either_end_is_replaced() {
        let key = "sk-live-0123456789abcdef"; // 24 bytes: a key is 8
        let pieces = (8..key.len())
            .map(|n| key[..n].to_string())
            .chain((8..key.len()).map(|n| key[key.len() - n..].to_string()))
            .chain([format!("{}...{}", &key[..8], &key[16..])]);
        for piece in pieces {
            let value = CredentialValue::new(Secret::new(key.into()));
            let mut r = Redactor::new(Arc::new(value), None);
            let text = format!("data: bad key: Bearer {piece}\n\ndata: next\n\n");
            let mut out = push(&mut r, text.as_bytes());
            out.extend_from_slice(&r.finish());
            let out = String::from_utf8_lossy(&out);
            // (A tail cut takes the credential's length back from its end, up to a line break:
            // here `bad key: Bearer ` too, for the shortest.)
            assert!(out.starts_with("data: "), "{piece}: {out}");
            assert!(
                out.ends_with("[redacted]\n\ndata: next\n\n"),
                "{piece}: {out}"
            );
            assert!(
                !(0..=key.len() - 8).any(|i| out.contains(&key[i..i + 8])),
                "{piece}: {out}"
            );
            let value = CredentialValue::new(Secret::new(key.into()));
            let mut r = Redactor::new(Arc::new(value), None);
            let mut h = HeaderMap::new();
            h.insert("x-echo", format!("Bearer {piece}").parse().unwrap());
            r.headers(&mut h);
            let echo = h["x-echo"].to_str().unwrap();
            assert!(echo.ends_with("[redacted]"), "{piece}: {echo}");
            assert!(
                !(0..=key.len() - 8).any(|i| echo.contains(&key[i..i + 8])),
                "{echo}"
            );
        }
        // Inside a text, a cut reflection takes as many bytes as the whole credential has (up
        // to a line break), whatever follows the cut: what goes must not tell how much matched.
        let mut r = redactor();
        let text = r#"{"error":"sk-live-01...", "hint": "see the docs"}"#;
        let mut out = push(&mut r, text.as_bytes());
        out.extend_from_slice(&r.finish());
        assert_eq!(out, br#"{"error":"[redacted]int": "see the docs"}"#);
        // Its base64 cut short too.
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode("sk-live-0123456789");
        let mut r = redactor();
        let mut out = push(&mut r, &b64.as_bytes()[..b64.len() - 3]);
        out.extend_from_slice(&r.finish());
        assert_eq!(out, b"[redacted]");
        // Less than a key at either end is not (it could be anything's).
        let mut r = redactor();
        let mut out = push(&mut r, b"id sk-live!, 2345678");
        out.extend_from_slice(&r.finish());
        assert_eq!(out, b"id sk-live!, 2345678");
        // A whole reflection is replaced exactly, not by the length of a longer spelling that
        // shares its ends.
        let value = CredentialValue::new(Secret::new("sk/live\"0123456789".into()));
        let mut r = Redactor::new(Arc::new(value), None);
        let mut out = push(&mut r, br#"["sk/live\"0123456789"]"#);
        out.extend_from_slice(&r.finish());
        assert_eq!(out, br#"["[redacted]"]"#);
    }

    /// SECURITY: once an occurrence's first third is there, what is replaced is as long as the
    /// whole credential whatever follows (up to a line break), so an upstream that echoes the
    /// agent's own text does not tell it, by where the marker ends, whether its guess at the
    /// next character was right. Nor does a line break after the first third let it out early.
    #[test]
    fn what_is_replaced_does_not_tell_how_far_a_guess_matched() {
        let key = "sk-live-0123456789";
        for pad in 0..12 {
            let outs: std::collections::HashSet<Vec<u8>> = "0123456789abcdef"
                .chars()
                .map(|c| {
                    let mut r = redactor();
                    let text = format!("echo: {}{c}{}|end", &key[..9], ".".repeat(pad));
                    let mut out = push(&mut r, text.as_bytes());
                    out.extend_from_slice(&r.finish());
                    out
                })
                .collect();
            assert_eq!(outs.len(), 1, "pad {pad}: {outs:?}");
        }
        let text = b"data: sk-live-0\nnext line, and more\n";
        for at in 1..text.len() {
            let mut r = redactor();
            let mut out = push(&mut r, &text[..at]);
            out.extend(push(&mut r, &text[at..]));
            out.extend_from_slice(&r.finish());
            let shown = String::from_utf8_lossy(&out);
            assert!(!shown.contains("sk-live-0"), "split at {at}: {shown}");
            assert!(
                shown.starts_with("data: [redacted]"),
                "split at {at}: {shown}"
            );
        }
    }

    /// SECURITY: every spelling's keys have the value's key length, so spellings that share
    /// their first bytes are found together: the marker is as wide whatever the agent's
    /// guess at the character after the key (with a key per spelling's own length, a longer
    /// spelling was found one character later, and the wider marker told a right guess).
    #[test]
    fn spellings_sharing_a_start_are_found_together_whatever_follows_the_key() {
        let key = "R5Kjp1vRtA1fjO/S/6ilI+ihN5KXqZ";
        for known in 10..14 {
            let outs: std::collections::HashSet<Vec<u8>> =
                "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                    .chars()
                    .map(|g| {
                        let value = CredentialValue::new(Secret::new(key.into()));
                        let mut r = Redactor::new(Arc::new(value), None);
                        let text = format!("{}{g}{}|", &key[..known], ".".repeat(40));
                        let mut out = push(&mut r, text.as_bytes());
                        out.extend_from_slice(&r.finish());
                        out
                    })
                    .collect();
            assert_eq!(outs.len(), 1, "{known} known: {outs:?}");
        }
    }

    /// A line of cut reflections closer together than the credential's length chains into
    /// overlapping spans; what is held back stays bounded (twice the longest needle) and the
    /// stream goes on, instead of the whole line being held and searched again per frame.
    #[test]
    fn a_chain_of_cut_reflections_holds_back_a_bounded_tail() {
        let mut r = redactor();
        let frame = "sk-live-01,".repeat(100);
        let mut out = Vec::new();
        for _ in 0..40 {
            out.extend(push(&mut r, frame.as_bytes()));
            assert!(r.carry.len() <= 2 * r.longest, "{} held", r.carry.len());
        }
        assert!(out.len() > 100, "nothing went out before the end");
        out.extend_from_slice(&r.finish());
        assert!(!String::from_utf8_lossy(&out).contains("sk-live-0"));
    }

    /// A cut reflection at a line's start takes bytes back only up to the line break: the
    /// event before it is intact.
    #[test]
    fn a_tail_cut_takes_nothing_back_past_a_line_break() {
        let key = "sk-live-0123456789abcdef";
        for n in 8..key.len() {
            let value = CredentialValue::new(Secret::new(key.into()));
            let mut r = Redactor::new(Arc::new(value), None);
            let text = format!("data: first\n\n{}\n\n", &key[key.len() - n..]);
            let mut out = push(&mut r, text.as_bytes());
            out.extend_from_slice(&r.finish());
            assert_eq!(out, b"data: first\n\n[redacted]\n\n", "{n}");
        }
    }

    /// The Basic pair's own head, cut short (its first bytes encode the username, which no
    /// spelling of the value holds), is found too.
    #[test]
    fn a_basic_pair_cut_short_is_found_by_its_own_keys() {
        let value = Arc::new(CredentialValue::new(Secret::new(
            "sk-live-0123456789abcdef".into(),
        )));
        let basic = Injection::Basic {
            username: "a-long-service-account-name".into(),
            credential: 0,
        };
        let pair = basic_pair("a-long-service-account-name", value.secret());
        let k = value.key_len();
        let mut r = Redactor::for_injection(&basic, value);
        let text = format!("auth: Basic {} end", &pair[..k + 1]);
        let mut out = push(&mut r, text.as_bytes());
        out.extend_from_slice(&r.finish());
        let shown = String::from_utf8_lossy(&out);
        assert!(shown.starts_with("auth: Basic [redacted]"), "{shown}");
        assert!(!shown.contains(&pair[..k]), "{shown}");
    }

    /// A cut occurrence's span that ends just before a frame's end must not take the start of
    /// the next occurrence, whose key only the next frame completes: held, not replaced, until
    /// it is (found by the property test below: the second occurrence's rest came through).
    #[test]
    fn a_span_ending_at_a_frames_end_waits_for_the_next_occurrences_key() {
        let key = "sk-live-u8jzPde0IgxLd6GncfBAepfJBd0Kh8oO";
        let text = format!("aa{}.{}", &key[..34], &key[..19]);
        // (The first span, 40 bytes from `sk-`, ends 14 bytes before the text's end.)
        for cut in 1..text.len() {
            let value = CredentialValue::new(Secret::new(key.into()));
            let mut r = Redactor::new(Arc::new(value), None);
            let mut out = push(&mut r, &text.as_bytes()[..cut]);
            out.extend(push(&mut r, &text.as_bytes()[cut..]));
            out.extend_from_slice(&r.finish());
            assert_eq!(out, b"aa[redacted]", "cut at {cut}");
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// SECURITY (I4): whatever mix of whole reflections, cuts that keep a key at either
        /// end, and other text an upstream sends, however it is framed, no key-long window of
        /// the credential reaches the agent.
        #[test]
        fn no_key_long_window_of_the_credential_comes_through(
            spelling in 0usize..32,
            pieces in proptest::collection::vec((0u8..4, 0usize..80, "[a-z.,:{}\" \n]{0,12}"), 1..12),
            cuts in proptest::collection::vec(1usize..400, 0..6),
        ) {
            let key = "sk-live-u8jzPde0IgxL/6GncfBAep+JBd0Kh8oO";
            let value = CredentialValue::new(Secret::new(key.into()));
            let k = value.key_len();
            // One of its spellings (raw, base64, percent, JSON, UTF-16...), whole or cut.
            let spellings = value.reflections();
            let form = spellings[spelling % spellings.len()].to_vec();
            let mut text = Vec::new();
            for (kind, n, filler) in &pieces {
                let n = k + n % (form.len() - k);
                match kind {
                    0 => text.extend_from_slice(&form),
                    1 => text.extend_from_slice(&form[..n]),
                    2 => text.extend_from_slice(&form[form.len() - n..]),
                    _ => {}
                }
                text.extend_from_slice(filler.as_bytes());
            }
            let value = CredentialValue::new(Secret::new(key.into()));
            let mut r = Redactor::new(Arc::new(value), None);
            let mut out = Vec::new();
            let mut at = 0;
            for cut in &cuts {
                let end = (at + cut).min(text.len());
                out.extend(push(&mut r, &text[at..end]));
                at = end;
            }
            out.extend(push(&mut r, &text[at..]));
            out.extend_from_slice(&r.finish());
            for window in form.windows(k) {
                proptest::prop_assert!(
                    !out.windows(k).any(|w| w == window),
                    "{:?} in {:?}",
                    String::from_utf8_lossy(window),
                    String::from_utf8_lossy(&out)
                );
            }
        }
    }

    #[test]
    fn header_names_carrying_the_secret_are_dropped() {
        let mut r = redactor();
        let mut h = HeaderMap::new();
        h.insert("x-sk-live-0123456789", "1".parse().unwrap());
        h.insert("x-d-sk-live-01234567", "1".parse().unwrap());
        h.insert("x-e-ve-0123456789", "1".parse().unwrap());
        h.insert("x-other", "fine".parse().unwrap());
        // Whole, or cut at either end (a name is lowercased on the way).
        assert_eq!(r.headers(&mut h), 3);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-other"], "fine");
    }

    #[test]
    fn what_is_held_back_does_not_depend_on_the_credential() {
        // The agent guesses; a streaming upstream echoes each guess at a frame's end. The
        // bytes released must be the same length whether the guess begins the secret or not.
        // A first event longer than what is held back (the longest needle less one byte).
        let first = format!("data: {}\n\n", "e".repeat(200));
        let released = |frame: &[u8]| {
            let mut r = redactor();
            let mut out = push(&mut r, first.as_bytes());
            out.extend(push(&mut r, frame));
            (out.len(), r.holds())
        };
        let longest = redactor().longest;
        assert!(first.len() > longest);
        // (Guesses shorter than what an occurrence must have: `match_len`, 9 bytes here.)
        for guess in ["sk-li", "sk-live-", "xx-li", "sk-lx", "zzzzzzzzzzzzzzz"] {
            // Everything up to the last line break goes out; what follows it is held.
            let frame = format!("data: {guess}");
            assert_eq!(released(frame.as_bytes()), (first.len(), true), "{guess}");
            // Without a break within reach, the last `longest - 1` bytes are held.
            let frame = format!("data: {}{guess}", "e".repeat(longest));
            let expected = first.len() + frame.len() - (longest - 1);
            assert_eq!(released(frame.as_bytes()), (expected, true), "{guess}");
        }
        // What was held goes out with the next frame (or at the end).
        let mut r = redactor();
        let mut out = push(&mut r, b"data: event 1\n\n");
        assert_eq!(out, b"data: event 1\n\n", "a whole event waits for nothing");
        assert!(!r.holds());
        out.extend(push(&mut r, b"data: sk-li"));
        out.extend(push(&mut r, b"ve!\r\n"));
        assert_eq!(out, b"data: event 1\n\ndata: sk-live!\r\n");
        assert!(!r.holds());
    }

    #[test]
    fn bytes_go_out_up_to_the_last_byte_no_spelling_holds() {
        // A printable-ASCII value: every byte but printable ASCII, tab and NUL is a break, so
        // a binary stream (gRPC: a length prefix, protobuf tags) is not held to its next frame.
        let mut r = redactor();
        assert_eq!(r.breaks, Breaks::NotPrintable);
        let grpc = b"\x00\x00\x00\x00\x07\x08\x96\x01\x12\x02ok";
        assert_eq!(
            push(&mut r, grpc),
            b"\x00\x00\x00\x00\x07\x08\x96\x01\x12\x02"
        );
        assert_eq!(
            r.finish().as_ref(),
            b"ok",
            "printable text may begin a spelling"
        );
        // Never a NUL or a tab: UTF-16 spellings hold NULs, a value may hold a tab.
        let mut r = redactor();
        assert!(push(&mut r, b"abc\x00def\tghi").is_empty());
        // `Ċ` (U+010A) is `0A 01` in UTF-16LE: for that value no byte is a break at all.
        let value = CredentialValue::new(Secret::new("sk-\u{10A}uni-0123456789".into()));
        assert_eq!(value.breaks(), Breaks::None);
        let mut r = Redactor::new(Arc::new(value), None);
        let event = b"data: event 1\n\n";
        assert!(push(&mut r, event).is_empty(), "released at a line break");
        assert!(r.holds());
        assert_eq!(r.finish().as_ref(), event);
        // Another non-ASCII value: line breaks only (its UTF-8 bytes may be in a spelling).
        let value = CredentialValue::new(Secret::new("sk-\u{e9}t\u{e9}-0123456789".into()));
        assert_eq!(value.breaks(), Breaks::LineBreaks);
        let mut r = Redactor::new(Arc::new(value), None);
        assert_eq!(push(&mut r, b"x\n\xc3\xa9"), b"x\n");
    }

    #[test]
    fn no_spelling_of_a_printable_value_holds_a_break() {
        // What `breaks_of` checks for each value, over values with every printable byte.
        let all: String = (0x20u8..0x7f).map(char::from).collect();
        for value in [
            all.as_str(),
            "sk-live-0123456789",
            "a\tb c",
            "~!@#$%^&*()_+{}|:<>?",
        ] {
            let v = CredentialValue::new(Secret::new(value.into()));
            assert_eq!(v.breaks(), Breaks::NotPrintable, "{value:?}");
        }
    }

    #[test]
    fn a_credential_is_never_released_in_part_before_the_frame_that_completes_it() {
        // However the upstream splits a reflection (and however long it pauses between the
        // parts), nothing of it goes out before the frame that completes it has been seen.
        let secret = "sk-live-0123456789";
        for split in 1..secret.len() {
            for before in ["", "x", "data: {\"echo\": \"", "line\nmore ", "\r\n\r\n"] {
                let mut r = redactor();
                let first = format!("{before}Bearer {}", &secret[..split]);
                let out = push(&mut r, first.as_bytes());
                let shown = String::from_utf8_lossy(&out).into_owned();
                let part = &secret[..split.min(4)];
                assert!(
                    !shown.contains(&format!("Bearer {part}")),
                    "split {split} after {before:?}: released {shown:?}"
                );
                let mut all = out;
                all.extend(push(
                    &mut r,
                    format!("{}\"}}\n", &secret[split..]).as_bytes(),
                ));
                all.extend_from_slice(&r.finish());
                let all = String::from_utf8_lossy(&all).into_owned();
                assert_eq!(
                    all,
                    format!("{before}Bearer [redacted]\"}}\n"),
                    "split {split}"
                );
            }
        }
    }

    #[test]
    fn a_needle_split_anywhere_across_frames_is_replaced_whole() {
        let value = CredentialValue::new(Secret::new("sk/live+0123?456789>>".into()));
        let basic = Injection::Basic {
            username: "bot".into(),
            credential: 0,
        };
        let needles: Vec<Vec<u8>> = Redactor::for_injection(&basic, Arc::new(value))
            .needles()
            .map(|(n, _)| n.to_vec())
            .collect();
        // Raw, base64 (standard, URL-safe, at three alignments), percent (upper-, lowercase
        // hex; as Python's quote, JavaScript's encodeURI and escape write it), JSON with `\/`
        // and HTML-safe (`>` as `\u003e`), UTF-16 (two byte orders), the Basic pair.
        assert_eq!(needles.len(), 17);
        let contains = |hay: &[u8], n: &[u8]| hay.windows(n.len()).any(|w| w == n);
        for needle in &needles {
            for k in 1..needle.len() {
                let value = CredentialValue::new(Secret::new("sk/live+0123?456789>>".into()));
                let mut r = Redactor::for_injection(&basic, Arc::new(value));
                let mut frame = b"data: ".to_vec();
                frame.extend_from_slice(&needle[..k]);
                let sent = push(&mut r, &frame);
                assert!(
                    !contains(&sent, &needle[..k]),
                    "{k} bytes of {needle:?} sent"
                );
                let mut out = sent;
                out.extend(push(&mut r, &needle[k..]));
                out.extend_from_slice(&r.finish());
                // The rest of the needle completes it: the whole is replaced.
                assert_eq!(out, b"data: [redacted]", "{k} bytes of {needle:?}");
            }
        }
    }

    #[test]
    fn a_secret_reflected_inside_json_strings_is_redacted() {
        let value = CredentialValue::new(Secret::new("sk/live\"0123456789".into()));
        let mut r = Redactor::new(Arc::new(value), None);
        let body = r#"{"php":"sk\/live\"0123456789","serde":"sk/live\"0123456789"}"#;
        let mut out = push(&mut r, body.as_bytes());
        out.extend_from_slice(&r.finish());
        assert_eq!(
            String::from_utf8(out).unwrap(),
            r#"{"php":"[redacted]","serde":"[redacted]"}"#
        );
        assert_eq!(r.found(), 2);
    }

    #[test]
    fn small_and_large_haystacks_are_searched_alike() {
        let needle = b"sk-live-0123456789";
        for len in [needle.len(), SMALL_HAY - 1, SMALL_HAY, 3 * SMALL_HAY] {
            for at in [0, (len - needle.len()) / 2, len - needle.len()] {
                let mut hay = vec![b's'; len];
                hay[at..at + needle.len()].copy_from_slice(needle);
                assert_eq!(find(&hay, needle), Some(at), "len {len} at {at}");
                hay[at + needle.len() - 1] = b'x';
                assert_eq!(find(&hay, needle), None, "len {len} at {at}");
            }
        }
        assert_eq!(find(b"short", needle), None);
    }

    #[test]
    fn clean_bodies_pass_unchanged() {
        let mut r = redactor();
        let mut out = push(&mut r, b"hello ");
        out.extend_from_slice(&push(&mut r, b"world"));
        out.extend_from_slice(&r.finish());
        assert_eq!(out, b"hello world");
        assert_eq!(r.found(), 0);
    }
}
