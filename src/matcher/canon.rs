//! Canonical request paths: the request target as received becomes either a list of canonical
//! segments for matching, or an [`Ambiguity`] — a reason to refuse it (SPEC §4.4).
//!
//! keyward must match what the upstream will see, so a path that servers could read in two
//! ways (dot segments, encoded separators, double encoding, `;` parameters, ...) is refused
//! instead of guessed at. Percent-encoded unreserved characters are decoded (`%7E` is `~` to
//! every server); other `%XX` triplets are kept with upper-case hex.
//!
//! Must never: modify the bytes that are forwarded (`raw_path()` is exactly what was
//! received), allocate more than one `String` and one `Vec` per request, or panic on any input.

use std::fmt;

/// Most bytes a request path (without its query) may have.
pub const MAX_PATH_BYTES: usize = 8 * 1024;
/// Most segments a request path may have.
pub const MAX_SEGMENTS: usize = 128;

/// Why a request target is refused as ambiguous (SPEC §4.4). `as_str()` is a short stable code
/// used in deny details; Display is a one-line sentence. Neither echoes the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Ambiguity {
    /// The target does not start with `/` (absolute form is split by the caller; `*` and
    /// authority form never reach the matcher).
    NotOriginForm,
    /// A `#` anywhere: clients never send fragments, so one is a smuggling attempt.
    Fragment,
    /// A byte below 0x21 or 0x7f, raw anywhere or percent-encoded (`%00`-`%1F`, `%7F`) in the
    /// path: servers truncate or split on them.
    ControlByte,
    /// A raw byte >= 0x80 in the path: servers disagree on how to decode it.
    NonAscii,
    /// A raw `\`: some servers treat it as `/`.
    Backslash,
    /// `%2F`: some servers decode it into a separator.
    EncodedSlash,
    /// `%5C`: some servers decode it into a separator.
    EncodedBackslash,
    /// `%25`: double encoding, decoded twice by some stacks.
    EncodedPercent,
    /// `%3F` or `%23`: a hop that decodes the path before passing it on (nginx's `$uri`,
    /// Apache's `[P]` rewrites) reads it as the start of the query or fragment and cuts the
    /// path short there, so the upstream would run a prefix of the route that was matched.
    EncodedDelimiter,
    /// `%` not followed by two hex digits.
    MalformedPercent,
    /// `;` raw or as `%3B`: path parameters that some servers strip (`..;/`).
    Semicolon,
    /// A `.` or `..` segment, also when spelled with `%2E`.
    DotSegment,
    /// `//`: servers disagree on whether empty segments collapse.
    EmptySegment,
    /// Percent-encoded bytes that are not valid UTF-8 (overlong `%C0%AE` for `.`, a lone lead
    /// byte): decoders disagree on them, and some read an overlong form as the ASCII it spells.
    InvalidUtf8,
    /// A percent-encoded character that Unicode compatibility normalization (NFKC) or a
    /// best-fit mapping turns into `.`, `/`, `\`, `;`, `%`, `?` or `#` (fullwidth `．／`, the
    /// dot leader `․`): an upstream that normalizes would read another path.
    Lookalike,
    /// Path over [`MAX_PATH_BYTES`] bytes or over [`MAX_SEGMENTS`] segments.
    TooLong,
}

impl Ambiguity {
    /// Short stable code for deny details and tests.
    pub fn as_str(self) -> &'static str {
        match self {
            Ambiguity::NotOriginForm => "not_origin_form",
            Ambiguity::Fragment => "fragment",
            Ambiguity::ControlByte => "control_byte",
            Ambiguity::NonAscii => "non_ascii",
            Ambiguity::Backslash => "backslash",
            Ambiguity::EncodedSlash => "encoded_slash",
            Ambiguity::EncodedBackslash => "encoded_backslash",
            Ambiguity::EncodedPercent => "encoded_percent",
            Ambiguity::EncodedDelimiter => "encoded_delimiter",
            Ambiguity::MalformedPercent => "malformed_percent",
            Ambiguity::Semicolon => "semicolon",
            Ambiguity::DotSegment => "dot_segment",
            Ambiguity::EmptySegment => "empty_segment",
            Ambiguity::InvalidUtf8 => "invalid_utf8",
            Ambiguity::Lookalike => "lookalike",
            Ambiguity::TooLong => "too_long",
        }
    }
}

impl fmt::Display for Ambiguity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Ambiguity::NotOriginForm => "the request target is not a path starting with `/`",
            Ambiguity::Fragment => "the request target contains a fragment (`#`)",
            Ambiguity::ControlByte => {
                "the request target contains a raw space, a control byte or DEL (the last two \
                 also percent-encoded in the path)"
            }
            Ambiguity::NonAscii => "the path contains a raw non-ASCII byte; percent-encode it",
            Ambiguity::Backslash => "the path contains `\\`",
            Ambiguity::EncodedSlash => "the path contains an encoded `/` (`%2F`)",
            Ambiguity::EncodedBackslash => "the path contains an encoded `\\` (`%5C`)",
            Ambiguity::EncodedPercent => {
                "the path contains an encoded `%` (`%25`): double encoding"
            }
            Ambiguity::EncodedDelimiter => {
                "the path contains an encoded `?` or `#` (`%3F`, `%23`), or a constraint value \
                 either one, which a decoding hop reads as the start of the query or fragment"
            }
            Ambiguity::MalformedPercent => "the path contains `%` not followed by two hex digits",
            Ambiguity::Semicolon => {
                "the path contains `;` (raw or `%3B`), which some servers strip as a path parameter"
            }
            Ambiguity::DotSegment => {
                "the path contains a `.` or `..` segment (possibly percent-encoded, or padded \
                 with encoded blanks), or one of dots alone"
            }
            Ambiguity::EmptySegment => "the path contains an empty segment (`//`)",
            Ambiguity::InvalidUtf8 => {
                "the path has percent-encoded bytes that are not valid UTF-8 (such as overlong forms)"
            }
            Ambiguity::Lookalike => {
                "the path has an encoded character that normalizes to `.`, `/`, `\\`, `;`, `%`, `?` or `#`"
            }
            // Numbers spelled out to keep this a &'static str; a test ties them to the constants.
            Ambiguity::TooLong => {
                "the path is longer than 8192 bytes or has more than 128 segments"
            }
        })
    }
}

impl std::error::Error for Ambiguity {}

/// A path as the matcher sees it: segments with percent-encoded unreserved characters decoded
/// and other `%XX` triplets kept with upper-case hex. Only [`canonicalize`] builds one.
///
/// `"/"` has zero segments; a single trailing `/` yields a final empty segment (`"/a/"` is
/// `["a", ""]`), so it only matches routes written with a trailing `/`. No other segment is
/// empty, none is `.` or `..`, and there are at most [`MAX_SEGMENTS`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonPath {
    /// The raw path (`..raw_len`), then — only when the path has a `%` — the canonical
    /// segments joined by `/`. One allocation serves both, and segment ranges point into it
    /// (into the raw part when canonical equals raw), so joined spans are plain slices.
    buf: String,
    raw_len: usize,
    /// Byte ranges of the segments in `buf`. u16 is enough: `buf` is at most 2 * 8 KiB.
    segs: Vec<(u16, u16)>,
}

impl CanonPath {
    /// The path as received, without the query: what the audit record shows and what is
    /// forwarded. Never modified.
    pub fn raw_path(&self) -> &str {
        self.buf.get(..self.raw_len).unwrap_or("")
    }

    /// Number of segments (`"/"` has 0, `"/a/"` has 2).
    pub fn len(&self) -> usize {
        self.segs.len()
    }

    /// True for `"/"`.
    pub fn is_empty(&self) -> bool {
        self.segs.is_empty()
    }

    /// Canonical segment `i`; `""` when `i >= len()` (callers index within `len()`).
    pub fn segment(&self, i: usize) -> &str {
        match self.segs.get(i) {
            Some(&(s, e)) => self.buf.get(usize::from(s)..usize::from(e)).unwrap_or(""),
            None => "",
        }
    }

    /// The canonical segments in order.
    pub fn segments(&self) -> impl Iterator<Item = &str> + '_ {
        self.segs
            .iter()
            .map(|&(s, e)| self.buf.get(usize::from(s)..usize::from(e)).unwrap_or(""))
    }

    /// Segments `start..end` joined by `/`, borrowed (the value of a `{*rest}` capture);
    /// `""` when the range is empty or out of bounds.
    pub fn span(&self, start: usize, end: usize) -> &str {
        if start >= end {
            return "";
        }
        match (
            self.segs.get(start),
            end.checked_sub(1).and_then(|l| self.segs.get(l)),
        ) {
            (Some(&(s, _)), Some(&(_, e))) => {
                self.buf.get(usize::from(s)..usize::from(e)).unwrap_or("")
            }
            _ => "",
        }
    }

    /// Segments `i..` joined by `/`, borrowed.
    pub fn tail(&self, i: usize) -> &str {
        self.span(i, self.segs.len())
    }

    /// Segments `i..` joined by `/` (for `{*rest}` values). Prefer [`CanonPath::tail`] on hot
    /// paths: it does not allocate.
    pub fn join_from(&self, i: usize) -> String {
        self.tail(i).to_owned()
    }
}

/// Canonicalizes `target`, the request's path-and-query exactly as received (`"/a/b?x=1"`).
///
/// The query (after the first `?`) is ignored for matching and may contain anything except
/// `#` and control bytes. Problems are reported left to right: the first one found wins.
pub fn canonicalize(target: &str) -> Result<CanonPath, Ambiguity> {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let Some(body) = path.strip_prefix('/') else {
        return Err(Ambiguity::NotOriginForm);
    };
    if path.len() > MAX_PATH_BYTES {
        return Err(Ambiguity::TooLong);
    }
    // Every segment but "/"'s is preceded by exactly one '/'.
    let seg_count = if body.is_empty() {
        0
    } else {
        path.bytes().filter(|&b| b == b'/').count()
    };
    if seg_count > MAX_SEGMENTS {
        return Err(Ambiguity::TooLong);
    }

    let has_percent = body.contains('%');
    // Canonical text is never longer than the raw path, so this never reallocates.
    let mut buf = String::with_capacity(if has_percent {
        2 * path.len()
    } else {
        path.len()
    });
    buf.push_str(path);
    let mut segs: Vec<(u16, u16)> = Vec::with_capacity(seg_count);

    if !body.is_empty() {
        let mut raw_start = 1usize; // offset of the current raw segment in `buf`
        for (idx, raw_seg) in body.split('/').enumerate() {
            let (start, end) = if has_percent {
                if idx > 0 {
                    buf.push('/');
                }
                let start = buf.len();
                decode_segment(raw_seg, &mut buf)?;
                (start, buf.len())
            } else {
                raw_seg.bytes().try_for_each(check_raw_byte)?;
                (raw_start, raw_start + raw_seg.len())
            };
            raw_start += raw_seg.len() + 1;
            let seg = buf.get(start..end).unwrap_or("");
            if seg.is_empty() && idx + 1 != seg_count {
                return Err(Ambiguity::EmptySegment);
            }
            if is_dot_segment(seg) {
                return Err(Ambiguity::DotSegment);
            }
            let start = u16::try_from(start).map_err(|_| Ambiguity::TooLong)?;
            let end = u16::try_from(end).map_err(|_| Ambiguity::TooLong)?;
            segs.push((start, end));
        }
    }

    for b in query.bytes() {
        match b {
            b'#' => return Err(Ambiguity::Fragment),
            0..=0x20 | 0x7f => return Err(Ambiguity::ControlByte),
            _ => {}
        }
    }

    Ok(CanonPath {
        buf,
        raw_len: path.len(),
        segs,
    })
}

/// A segment of dots alone (`.`, `..`, `...`), or of dots and blanks (`..%20`, `%C2%A0..`,
/// `..+`: form-style decoders such as Java's `URLDecoder` read `+` as a space): servers that
/// trim blanks from segments (Java's and JavaScript's `trim`) or drop trailing dots and spaces
/// (Windows) read a dot segment. `seg` is canonical, so the only `%` in it begin triplets.
fn is_dot_segment(seg: &str) -> bool {
    if !seg.starts_with(['.', '%', '+']) {
        return false; // the common case, decided by one byte
    }
    if seg.bytes().all(|b| b == b'.') {
        return true;
    }
    if !seg.contains('.') || !seg.contains(['%', '+']) {
        return false;
    }
    let decoded = percent_decode(seg);
    let text = String::from_utf8_lossy(&decoded);
    let blank = |c: char| c.is_whitespace() || c == '+';
    let inner = text.trim_matches(blank);
    !inner.is_empty() && inner.chars().all(|c| c == '.' || blank(c))
}

fn percent_decode(raw: &str) -> Vec<u8> {
    let mut decoded = Vec::with_capacity(raw.len());
    let mut bytes = raw.bytes();
    while let Some(b) = bytes.next() {
        if b == b'%' {
            let hi = bytes.next().and_then(hex_value).unwrap_or(0);
            let lo = bytes.next().and_then(hex_value).unwrap_or(0);
            decoded.push((hi << 4) | lo);
        } else {
            decoded.push(b);
        }
    }
    decoded
}

/// Refuses the raw path bytes that are ambiguous by themselves.
fn check_raw_byte(b: u8) -> Result<(), Ambiguity> {
    match b {
        0..=0x20 | 0x7f => Err(Ambiguity::ControlByte),
        0x80..=0xff => Err(Ambiguity::NonAscii),
        b'\\' => Err(Ambiguity::Backslash),
        b';' => Err(Ambiguity::Semicolon),
        b'#' => Err(Ambiguity::Fragment),
        _ => Ok(()),
    }
}

/// RFC 3986 unreserved: decoding these never changes how any server reads the path.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

const HEX_UPPER: &[u8; 16] = b"0123456789ABCDEF";

/// Appends the canonical form of one raw segment to `out`.
fn decode_segment(raw: &str, out: &mut String) -> Result<(), Ambiguity> {
    let mut bytes = raw.bytes();
    // Whether a `%XX` decoded to a byte >= 0x80: then the segment's decoded bytes must be
    // valid UTF-8 with no structural lookalike (checked after the loop, off the common path).
    let mut encoded_non_ascii = false;
    while let Some(b) = bytes.next() {
        if b != b'%' {
            check_raw_byte(b)?;
            // check_raw_byte let only ASCII through, so this keeps `out` valid UTF-8.
            out.push(char::from(b));
            continue;
        }
        let hi = bytes.next().and_then(hex_value);
        let lo = bytes.next().and_then(hex_value);
        let (Some(hi), Some(lo)) = (hi, lo) else {
            return Err(Ambiguity::MalformedPercent);
        };
        // SECURITY: each of these decodes, in some server, into something that changes how
        // the path is split or read; the matcher must not see one path and the upstream another.
        match (hi << 4) | lo {
            b'/' => return Err(Ambiguity::EncodedSlash),
            b'\\' => return Err(Ambiguity::EncodedBackslash),
            b'%' => return Err(Ambiguity::EncodedPercent),
            b'?' | b'#' => return Err(Ambiguity::EncodedDelimiter),
            b';' => return Err(Ambiguity::Semicolon),
            0..=0x1f | 0x7f => return Err(Ambiguity::ControlByte),
            v if is_unreserved(v) => out.push(char::from(v)),
            v => {
                encoded_non_ascii |= v >= 0x80;
                out.push('%');
                for nibble in [hi, lo] {
                    let digit = HEX_UPPER.get(usize::from(nibble)).copied().unwrap_or(b'0');
                    out.push(char::from(digit));
                }
            }
        }
    }
    if encoded_non_ascii {
        check_encoded_text(raw)?;
    }
    Ok(())
}

/// The segment fully percent-decoded must be UTF-8 without structural lookalikes. Only called
/// for segments whose `%XX` triplets were already checked well-formed.
fn check_encoded_text(raw: &str) -> Result<(), Ambiguity> {
    let decoded = percent_decode(raw);
    let text = std::str::from_utf8(&decoded).map_err(|_| Ambiguity::InvalidUtf8)?;
    // C1 controls (`%C2%85` is NEL, a line break to some) are control bytes as much as C0's.
    if text.chars().any(|c| matches!(c, '\u{80}'..='\u{9F}')) {
        return Err(Ambiguity::ControlByte);
    }
    if text.chars().any(is_structural_lookalike) {
        return Err(Ambiguity::Lookalike);
    }
    Ok(())
}

/// Characters that NFKC (or Windows' best-fit mapping) turns into text holding `.`, `/`, `\`,
/// `;`, `%`, `?` or `#`: the ones that could make a normalizing upstream read a dot segment,
/// a separator or the end of the path. The NFKC ones are every such code point of Unicode 14,
/// listed by
/// `python3 -c 'import unicodedata as u; print([hex(c) for c in range(128, 0x110000) if not 0xD800 <= c < 0xE000 and set(u.normalize("NFKC", chr(c))) & set("./\\;%?#")])'`
/// (52; a test holds them all refused).
fn is_structural_lookalike(c: char) -> bool {
    matches!(
        c,
        '\u{FF03}' | '\u{FF05}' | '\u{FF0E}' | '\u{FF0F}' | '\u{FF1B}' | '\u{FF1F}' | '\u{FF3C}' // fullwidth # % . / ; ? \
            | '\u{FE52}' | '\u{FE54}' | '\u{FE56}' | '\u{FE5F}' | '\u{FE68}' | '\u{FE6A}' // small . ; ? # \ %
            | '\u{FE14}' | '\u{FE16}' | '\u{FE19}' | '\u{FE30}' // vertical ; ? ... ..
            | '\u{2024}'..='\u{2026}' // one and two dot leader, ellipsis
            | '\u{2047}'..='\u{2049}' // ?? ?! !?
            | '\u{037E}' // Greek question mark (is `;`)
            | '\u{2100}' | '\u{2101}' | '\u{2105}' | '\u{2106}' // a/c a/s c/o c/u
            | '\u{2488}'..='\u{249B}' // digit full stops `1.`…`20.`
            | '\u{1F100}'..='\u{1F10A}' // digit full stop / comma
            | '\u{33C2}' | '\u{33C7}' | '\u{33D8}' // a.m. Co. p.m.
            | '\u{2044}' | '\u{2215}' | '\u{29F8}' // fraction, division, big solidus (best fit)
            | '\u{2216}' | '\u{29F5}' // set minus, reverse solidus operator (best fit `\`)
            | '\u{00A5}' | '\u{20A9}' // yen, won: `\` in the Japanese and Korean code pages
            // Invisible characters that sanitizers strip (`.\u{AD}.` would become `..`):
            | '\u{00AD}' | '\u{034F}' | '\u{180E}' | '\u{200B}'..='\u{200F}'
            | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{2064}' | '\u{FEFF}'
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn segs(target: &str) -> Vec<String> {
        match canonicalize(target) {
            Ok(p) => p.segments().map(str::to_owned).collect(),
            Err(e) => panic!("{target:?} refused: {e:?}"),
        }
    }

    /// Every code point of Unicode 14 whose NFKC form holds `.`, `/`, `\`, `;`, `%`, `?` or
    /// `#` (the command in `is_structural_lookalike`'s comment prints them), encoded in a
    /// path: refused.
    #[test]
    fn every_nfkc_structural_lookalike_is_refused() {
        const NFKC: &[u32] = &[
            0x37e, 0x2024, 0x2025, 0x2026, 0x2047, 0x2048, 0x2049, 0x2100, 0x2101, 0x2105, 0x2106,
            0x2488, 0x2489, 0x248a, 0x248b, 0x248c, 0x248d, 0x248e, 0x248f, 0x2490, 0x2491, 0x2492,
            0x2493, 0x2494, 0x2495, 0x2496, 0x2497, 0x2498, 0x2499, 0x249a, 0x249b, 0x33c2, 0x33c7,
            0x33d8, 0xfe14, 0xfe16, 0xfe19, 0xfe30, 0xfe52, 0xfe54, 0xfe56, 0xfe5f, 0xfe68, 0xfe6a,
            0xff03, 0xff05, 0xff0e, 0xff0f, 0xff1b, 0xff1f, 0xff3c, 0x1f100,
        ];
        assert_eq!(NFKC.len(), 52);
        for &cp in NFKC {
            let c = char::from_u32(cp).unwrap();
            let mut utf8 = [0u8; 4];
            let encoded: String = c
                .encode_utf8(&mut utf8)
                .bytes()
                .map(|b| format!("%{b:02X}"))
                .collect();
            assert_eq!(
                canonicalize(&format!("/a/x{encoded}y")).err(),
                Some(Ambiguity::Lookalike),
                "U+{cp:04X}"
            );
        }
    }

    #[test]
    fn ambiguous_targets_are_refused() {
        use Ambiguity::*;
        let long_path = format!("/{}", "a".repeat(MAX_PATH_BYTES));
        let many_segments = "/a".repeat(MAX_SEGMENTS + 1);
        let cases: &[(&str, Ambiguity)] = &[
            ("", NotOriginForm),
            ("a/b", NotOriginForm),
            ("*", NotOriginForm),
            ("?x=1", NotOriginForm),
            ("http://h.test/a", NotOriginForm),
            ("/a#b", Fragment),
            ("/#", Fragment),
            ("/a?x#y", Fragment),
            ("/%41#", Fragment),
            ("/a b", ControlByte),
            ("/a\tb", ControlByte),
            ("/a\0", ControlByte),
            ("/a\x7f", ControlByte),
            ("/%41\r", ControlByte),
            ("/a?x y", ControlByte),
            ("/a?x\n", ControlByte),
            ("/a%00", ControlByte),
            ("/a%0a", ControlByte),
            ("/a%0D%0A", ControlByte),
            ("/a%7F", ControlByte),
            ("/files/%c0%ae%c0%ae/admin", InvalidUtf8), // overlong `..`
            ("/files/%e0%80%ae%e0%80%ae/admin", InvalidUtf8),
            ("/files/a%c0%afb", InvalidUtf8), // overlong `/`
            ("/files/%c0%2e%c0%2e/admin", InvalidUtf8),
            ("/a%C3", InvalidUtf8),                         // a lone lead byte
            ("/a%ED%A0%80", InvalidUtf8),                   // a surrogate
            ("/files/%ef%bc%8e%ef%bc%8e/admin", Lookalike), // fullwidth `..`
            ("/a%EF%BC%8Fb", Lookalike),                    // fullwidth `/`
            ("/a%E2%80%A5", Lookalike),                     // two dot leader
            ("/a%CD%BE", Lookalike),                        // Greek question mark
            ("/a%E2%88%95b", Lookalike),                    // division slash
            ("/a%E2%88%96b", Lookalike),                    // set minus
            ("/files/.%C2%AD./admin", Lookalike),           // soft hyphen between dots
            ("/a%E2%80%8Bb", Lookalike),                    // zero-width space
            ("/a%EF%BB%BF", Lookalike),                     // BOM
            ("/a%EF%B8%B0b", Lookalike),                    // vertical two dot leader `..`
            ("/a%C2%A5b", Lookalike),                       // yen (best fit `\`)
            ("/caf\u{e9}", NonAscii),
            ("/%41\u{e9}", NonAscii),
            ("/a\\b", Backslash),
            ("/%41\\..", Backslash),
            ("/a%2Fb", EncodedSlash),
            ("/a%2f..%2f", EncodedSlash),
            ("/a%5Cb", EncodedBackslash),
            ("/a%5c", EncodedBackslash),
            ("/a%25", EncodedPercent),
            ("/a%252e%252e", EncodedPercent),
            ("/labels/%3F", EncodedDelimiter),
            ("/issues/1%3f/comments", EncodedDelimiter),
            ("/issues/1%23/comments", EncodedDelimiter),
            ("/a%", MalformedPercent),
            ("/a%4", MalformedPercent),
            ("/a%4/b", MalformedPercent),
            ("/a%zz", MalformedPercent),
            ("/a%g1", MalformedPercent),
            ("/a%+1", MalformedPercent),
            ("/%%41", MalformedPercent),
            ("/a;b", Semicolon),
            ("/..;/admin", Semicolon),
            ("/a/;jsessionid=1", Semicolon),
            ("/a%3Bb", Semicolon),
            ("/a%3b", Semicolon),
            ("/.", DotSegment),
            ("/..", DotSegment),
            ("/./", DotSegment),
            ("/../", DotSegment),
            ("/a/./b", DotSegment),
            ("/a/../b", DotSegment),
            ("/a/..", DotSegment),
            ("/a/..?x", DotSegment),
            ("/%2e", DotSegment),
            ("/%2E%2e", DotSegment),
            ("/.%2E", DotSegment),
            ("/a/%2e%2e/b", DotSegment),
            ("/a/.../b", DotSegment),
            ("/a/%2e%2e%2e", DotSegment),
            ("/files/..%20/x", DotSegment),
            ("/files/%20../x", DotSegment),
            ("/files/.%09./x", ControlByte),
            ("/files/..%C2%A0/x", DotSegment),
            ("/files/..%E3%80%80/x", DotSegment),
            ("/files/..%E2%80%A8/x", DotSegment),
            ("/files/%20.%20.%20/x", DotSegment),
            ("/files/..+/x", DotSegment),
            ("/files/+../x", DotSegment),
            ("/files/.+./x", DotSegment),
            ("/a/%C2%80", ControlByte),
            ("/a/%C2%85b", ControlByte),
            ("/a/x%C2%9F", ControlByte),
            ("//", EmptySegment),
            ("//a", EmptySegment),
            ("///", EmptySegment),
            ("/a//b", EmptySegment),
            ("/a//", EmptySegment),
            ("/a/b//", EmptySegment),
            ("/%41//b", EmptySegment),
            (&long_path, TooLong),
            (&many_segments, TooLong),
        ];
        for (target, want) in cases {
            assert_eq!(canonicalize(target), Err(*want), "target {target:?}");
        }
    }

    #[test]
    fn first_problem_from_the_left_wins() {
        assert_eq!(canonicalize("/a//b;c"), Err(Ambiguity::EmptySegment));
        assert_eq!(canonicalize("/a;b//c"), Err(Ambiguity::Semicolon));
        assert_eq!(canonicalize("/../a?#"), Err(Ambiguity::DotSegment));
        assert_eq!(canonicalize("/a?#/.."), Err(Ambiguity::Fragment));
    }

    #[test]
    fn limits_are_inclusive() {
        let longest = format!("/{}", "a".repeat(MAX_PATH_BYTES - 1));
        assert_eq!(canonicalize(&longest).map(|p| p.len()), Ok(1));
        let most = "/a".repeat(MAX_SEGMENTS);
        assert_eq!(canonicalize(&most).map(|p| p.len()), Ok(MAX_SEGMENTS));
        let most_with_trailing = format!("{}/", "/a".repeat(MAX_SEGMENTS - 1));
        assert_eq!(
            canonicalize(&most_with_trailing).map(|p| p.len()),
            Ok(MAX_SEGMENTS)
        );
        // The query does not count towards the path limit.
        let long_query = format!("/a?{}", "q".repeat(4 * MAX_PATH_BYTES));
        assert_eq!(canonicalize(&long_query).map(|p| p.len()), Ok(1));
    }

    #[test]
    fn unreserved_is_decoded_and_other_escapes_are_upper_cased() {
        let cases: &[(&str, &[&str])] = &[
            ("/%41", &["A"]),
            ("/%7E", &["~"]),
            ("/%7e", &["~"]),
            ("/a%2Db%5f%2E", &["a-b_."]),
            ("/%3a", &["%3A"]),
            ("/%3A", &["%3A"]),
            ("/a%21b%40", &["a%21b%40"]),
            ("/%20", &["%20"]),
            ("/caf%c3%a9", &["caf%C3%A9"]),
            ("/x/%61/", &["x", "a", ""]),
            ("/%61%62/c", &["ab", "c"]),
        ];
        for (target, want) in cases {
            assert_eq!(segs(target), *want, "target {target:?}");
        }
    }

    #[test]
    fn segments_raw_path_and_query() {
        assert!(segs("/").is_empty());
        assert!(segs("/?q=1").is_empty());
        assert_eq!(segs("/a"), ["a"]);
        assert_eq!(segs("/a/"), ["a", ""]);
        assert_eq!(segs("/a/b?x=1&y=/..//%2F;\\\u{e9}"), ["a", "b"]);
        assert_eq!(segs("/a?"), ["a"]);
        assert_eq!(segs("/a?b?c"), ["a"]);
        // Dots with other text, and blanks without a dot segment inside, are ordinary names.
        assert_eq!(
            segs("/.well-known/..a/a../v1.2%20x/%20/%C2%A0a./%E2%80%83/c++/+/a+.b"),
            [
                ".well-known",
                "..a",
                "a..",
                "v1.2%20x",
                "%20",
                "%C2%A0a.",
                "%E2%80%83",
                "c++",
                "+",
                "a+.b"
            ]
        );

        let p = canonicalize("/%61/b%62/c?x=%2F").unwrap();
        assert_eq!(p.raw_path(), "/%61/b%62/c");
        assert_eq!(p.len(), 3);
        assert!(!p.is_empty());
        assert_eq!(p.segment(1), "bb");
        assert_eq!(p.segment(3), "");
        assert_eq!(p.tail(0), "a/bb/c");
        assert_eq!(p.tail(1), "bb/c");
        assert_eq!(p.tail(3), "");
        assert_eq!(p.join_from(1), "bb/c");
        assert_eq!(p.span(0, 2), "a/bb");
        assert_eq!(p.span(2, 1), "");
        assert_eq!(p.span(1, 9), "");

        let p = canonicalize("/x/y/?q").unwrap();
        assert_eq!(p.raw_path(), "/x/y/");
        assert_eq!(p.tail(1), "y/");
        assert_eq!(p.join_from(2), "");

        let root = canonicalize("/").unwrap();
        assert!(root.is_empty());
        assert_eq!(root.raw_path(), "/");
        assert_eq!(root.tail(0), "");
    }

    #[test]
    fn codes_are_stable_and_distinct() {
        use Ambiguity::*;
        let all = [
            NotOriginForm,
            Fragment,
            ControlByte,
            NonAscii,
            Backslash,
            EncodedSlash,
            EncodedBackslash,
            EncodedPercent,
            EncodedDelimiter,
            MalformedPercent,
            Semicolon,
            DotSegment,
            EmptySegment,
            TooLong,
        ];
        let mut codes: Vec<&str> = all.iter().map(|a| a.as_str()).collect();
        assert_eq!(DotSegment.as_str(), "dot_segment");
        assert_eq!(EncodedSlash.as_str(), "encoded_slash");
        for a in all {
            let text = a.to_string();
            assert!(!text.is_empty() && !text.contains('\n'));
        }
        let too_long = TooLong.to_string();
        assert!(too_long.contains(&MAX_PATH_BYTES.to_string()));
        assert!(too_long.contains(&MAX_SEGMENTS.to_string()));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len());
    }

    /// A second, deliberately naive reading of SPEC §4.4 to check `canonicalize` against.
    fn reference(target: &str) -> Option<Vec<String>> {
        let (path, query) = match target.find('?') {
            Some(q) => (&target[..q], &target[q + 1..]),
            None => (target, ""),
        };
        if !path.starts_with('/') || path.len() > MAX_PATH_BYTES {
            return None;
        }
        if query.bytes().any(|b| b == b'#' || b < 0x21 || b == 0x7f) {
            return None;
        }
        if path == "/" {
            return Some(Vec::new());
        }
        let parts: Vec<&str> = path[1..].split('/').collect();
        if parts.len() > MAX_SEGMENTS {
            return None;
        }
        let mut out = Vec::new();
        for (i, part) in parts.iter().enumerate() {
            let b = part.as_bytes();
            let mut s = String::new();
            // Every byte the segment decodes to: percent-encoded bytes of 0x80 and up must
            // make, with the rest, UTF-8 text without C1 controls or structural look-alikes.
            let mut decoded = Vec::new();
            let mut j = 0;
            while j < b.len() {
                if b[j] == b'%' {
                    let hex = part.get(j + 1..j + 3)?;
                    if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                        return None;
                    }
                    let v = u8::from_str_radix(hex, 16).ok()?;
                    if b"/\\%;?#".contains(&v) || v < 0x20 || v == 0x7f {
                        return None;
                    }
                    decoded.push(v);
                    if v.is_ascii_alphanumeric() || b"-._~".contains(&v) {
                        s.push(char::from(v));
                    } else {
                        s.push_str(&format!("%{v:02X}"));
                    }
                    j += 3;
                } else {
                    if b[j] < 0x21 || b[j] >= 0x7f || b"\\;#".contains(&b[j]) {
                        return None;
                    }
                    s.push(char::from(b[j]));
                    decoded.push(b[j]);
                    j += 1;
                }
            }
            if decoded.iter().any(|&d| d >= 0x80) {
                let text = std::str::from_utf8(&decoded).ok()?;
                if text.chars().any(|c| {
                    ('\u{80}'..='\u{9F}').contains(&c) || super::is_structural_lookalike(c)
                }) {
                    return None;
                }
            }
            if (s.is_empty() && i + 1 != parts.len())
                || (!s.is_empty() && s.trim_matches('.').is_empty())
            {
                return None;
            }
            out.push(s);
        }
        Some(out)
    }

    fn tricky_target() -> impl Strategy<Value = String> {
        let piece = prop::sample::select(vec![
            "a", "b", "~", "/", "/", "/", "//", ".", "..", "%41", "%2e", "%2E", "%2F", "%5c",
            "%25", "%3a", "%3B", "%3f", "%23", "%00", "%7f", "%", "%4", "%zz", ";", "\\", " ",
            "\u{e9}", "#", "?", "&", "=", "%c3%A9", "{", "*",
        ]);
        prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_and_keeps_invariants(target in any::<String>()) {
            if let Ok(p) = canonicalize(&target) {
                check_invariants(&target, &p);
            }
        }

        #[test]
        fn agrees_with_reference(tail in tricky_target(), slash in any::<bool>()) {
            let target = if slash { format!("/{tail}") } else { tail };
            let got = canonicalize(&target).ok();
            if let Some(p) = &got {
                check_invariants(&target, p);
            }
            let got = got.map(|p| p.segments().map(str::to_owned).collect::<Vec<_>>());
            prop_assert_eq!(got, reference(&target), "target {:?}", target);
        }
    }

    fn check_invariants(target: &str, p: &CanonPath) {
        let raw = target.split('?').next().unwrap_or("");
        assert_eq!(p.raw_path(), raw);
        assert!(p.len() <= MAX_SEGMENTS);
        let segments: Vec<&str> = p.segments().collect();
        for (i, s) in segments.iter().enumerate() {
            assert!(!s.is_empty() || i + 1 == segments.len(), "{target:?}");
            assert!(*s != "." && *s != "..", "{target:?}");
            assert!(!s.contains('/'), "{target:?}");
        }
        // The canonical form is a fixed point: canonicalizing it again changes nothing.
        let again = canonicalize(&format!("/{}", segments.join("/"))).unwrap();
        assert!(again.segments().eq(segments.iter().copied()), "{target:?}");
        assert_eq!(p.tail(0), segments.join("/"));
    }
}
