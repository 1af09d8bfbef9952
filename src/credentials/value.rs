//! A credential value and the spellings an upstream may reflect it in (raw, base64,
//! percent-, form- and JSON-encoded, UTF-16), derived once per value for the redactor
//! (`proxy::redact`) and the egress scan.

use crate::secret::{base64_zeroizing, Secret};

/// A credential's value with the forms that are looked for on every request, derived once per
/// value rather than per request. Every copy zeroizes on drop.
pub struct CredentialValue {
    pub(super) secret: Secret,
    /// The value lowercased, for places that are case-folded on the way (header names, hosts).
    pub(super) folded: zeroize::Zeroizing<Vec<u8>>,
    /// The spellings an upstream may reflect it in, for the redactor (`proxy::redact`): raw
    /// always; base64 (standard and URL-safe, at each of the three alignments), percent-encoded
    /// (upper- and lowercase hex, as common encoders leave characters raw), JSON-escaped and
    /// UTF-16 (either byte order) when they differ from it and have at least 4 bytes.
    reflections: Vec<zeroize::Zeroizing<Vec<u8>>>,
    /// For each reflection, which of `GATE_BYTES` each of its keys holds (`gate_of`,
    /// `keys_of`), looked up once here rather than for every header value and frame the
    /// redactor scans.
    reflection_gates: Vec<[Option<u8>; 2]>,
    /// Which bytes no reflection holds, so that no occurrence can span one (the redactor lets
    /// a stream's held-back tail go up to the last such byte).
    breaks: Breaks,
    /// The first four bytes of each reflection's keys: a short text (most header values, a
    /// small body) that holds none of them holds no occurrence, looked up in one pass rather
    /// than one search per key. And the same lowercased, for header names (lowercased on the
    /// way).
    starts: StartSet,
    starts_folded: StartSet,
    /// How long every spelling's keys are (`keys_of`).
    key_len: usize,
}

/// A set of 4-byte strings, as a 65,536-bit filter (a string's bit is a hash of it, so a
/// string not in the set may be found in it: a text that holds one is then searched).
/// (`short`: a key under 4 bytes, which no text is spared a search for; spellings have 4.)
struct StartSet {
    bits: Box<zeroize::Zeroizing<[u64; 1024]>>,
    short: bool,
}

impl StartSet {
    fn of<'a>(keys: impl Iterator<Item = &'a [u8]>, fold: bool) -> StartSet {
        let mut set = Box::new(zeroize::Zeroizing::new([0u64; 1024]));
        let mut short = false;
        for key in keys {
            short |= key.len() < 4;
            if let Some(&[a, b, c, d]) = key.get(..4) {
                let start = match fold {
                    true => [a, b, c, d].map(|x| x.to_ascii_lowercase()),
                    false => [a, b, c, d],
                };
                let bit = start_bit(start);
                set[bit >> 6] |= 1 << (bit & 63);
            }
        }
        StartSet { bits: set, short }
    }

    /// Whether four bytes in a row of `hay` may be in the set.
    fn any_in(&self, hay: &[u8]) -> bool {
        let set: &[u64; 1024] = &self.bits;
        self.short
            || hay.windows(4).any(|w| {
                let bit = start_bit([w[0], w[1], w[2], w[3]]);
                set[bit >> 6] & (1 << (bit & 63)) != 0
            })
    }
}

/// The filter bit of a 4-byte string (a multiplicative hash, top 16 bits).
fn start_bit(start: [u8; 4]) -> usize {
    (u32::from_le_bytes(start).wrapping_mul(0x9e37_79b1) >> 16) as usize
}

/// The bytes no spelling of a value can hold, by the value's class alone (not by which
/// characters it has: what the redactor releases must not tell the secret's characters).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Breaks {
    /// A value of printable ASCII (and tabs): every spelling is printable ASCII, tabs and the
    /// NUL bytes of UTF-16, so any other byte — a line break, another control byte, a byte
    /// of 0x80 or more (binary data, UTF-8 text) — is a break.
    NotPrintable,
    /// Other values: `\n` and `\r`, when no spelling holds one (a UTF-16 form of `Ċ`,
    /// U+010A, holds 0x0A).
    LineBreaks,
    /// None: every byte may belong to a spelling.
    None,
}

impl Breaks {
    /// Whether `b` is a break of this class.
    pub fn is_break(self, b: u8) -> bool {
        match self {
            Breaks::NotPrintable => b != 0 && b != b'\t' && !(0x20..0x7f).contains(&b),
            Breaks::LineBreaks => b == b'\n' || b == b'\r',
            Breaks::None => false,
        }
    }
}

/// Bytes rare in the text APIs answer with, which many spellings hold (`%` percent forms, `\`
/// JSON escapes, NUL in UTF-16): a spelling holding one cannot be in a text without it, and
/// one `memchr` per text answers that for all of them (`proxy::redact`).
pub const GATE_BYTES: [u8; 3] = [b'%', b'\\', 0];

/// The length of the keys the redactor finds a value `len` bytes long by, at the start (the
/// head) and at the end (the tail) of each of its spellings: a third of the value, at least 8
/// bytes (a value of 8 or fewer, whole).
/// A reflection cut short is still a reflection: an upstream that echoes the first (or last) N
/// bytes of what it got ("bad header: Bearer sk-…") would otherwise hand over all but one
/// character, and the agent could try that one against `secret_egress`. A third, not a half:
/// a head cut and a tail cut together, each one byte short of its key, and one more character
/// at each end told by a guess the redactor replaced, still leave the agent a third to guess.
pub fn match_len(len: usize) -> usize {
    len.div_ceil(3).max(8).min(len)
}

/// A spelling's head and tail keys: `k` bytes at each end (all of it if it is shorter). Every
/// spelling of a value has keys of one length, `match_len` of the value's own: spellings that
/// share their first (or last) bytes then share their keys, found or not found together, so
/// what is replaced does not tell how far a guess at the next character went (a spelling
/// with a longer key, matched one character later, told it).
pub fn keys_of(needle: &[u8], k: usize) -> [&[u8]; 2] {
    let k = k.min(needle.len());
    let head = needle.get(..k).unwrap_or(needle);
    let tail = needle.get(needle.len() - k..).unwrap_or(needle);
    [head, tail]
}

/// The index in `GATE_BYTES` of the first gate byte `needle` holds.
pub fn gate_of(needle: &[u8]) -> Option<u8> {
    let i = GATE_BYTES
        .iter()
        .position(|&g| memchr::memchr(g, needle).is_some())?;
    u8::try_from(i).ok()
}

impl CredentialValue {
    pub fn new(secret: Secret) -> CredentialValue {
        use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
        use zeroize::Zeroizing;
        let raw = secret.expose().as_bytes();
        // Base64 of a text that holds the value at byte offset 0, 1 or 2 (mod 3), as in
        // `base64("Bearer " + value)`: only the characters made of the value's bits alone are
        // the same whatever surrounds it, so the needle is that stable middle.
        let base64 = |engine, offset: usize| {
            let mut padded = Zeroizing::new(vec![0u8; offset]);
            padded.extend_from_slice(raw);
            let encoded = base64_zeroizing(engine, &padded);
            let start = (8 * offset).div_ceil(6);
            let end = 8 * padded.len() / 6;
            Zeroizing::new(
                encoded
                    .as_bytes()
                    .get(start..end)
                    .unwrap_or_default()
                    .to_vec(),
            )
        };
        let percent = percent_encoded(raw, is_unreserved);
        // Some encoders write lowercase hex digits (`%2f`); only the digits, not the value's
        // own letters (lowercasing the whole form missed every value with a capital letter).
        let percent_lower = lowercase_hex_digits(&percent);
        // Common encoders leave more than RFC 3986's unreserved characters raw.
        let python_quote = percent_encoded(raw, |b| is_unreserved(b) || b == b'/');
        let js_component = percent_encoded(raw, |b| is_unreserved(b) || b"!'()*".contains(&b));
        let js_uri = percent_encoded(raw, |b| {
            is_unreserved(b) || b"!'()*;,/?:@&=+$#".contains(&b)
        });
        let js_escape = js_escape(secret.expose());
        // Form encoding (`+` for a space): Java's `URLEncoder` and the WHATWG serializer keep
        // `*`, PHP's `urlencode` does not (nor `~`, in all three); .NET's `HttpUtility` keeps
        // `!()*` and writes lowercase hex, `WebUtility` the same set in uppercase.
        let form_java = form_encoded(raw, b"-._*");
        let form_php = form_encoded(raw, b"-._");
        let form_dotnet = form_encoded(raw, b"-._!()*");
        let form_dotnet_lower = lowercase_hex_digits(&form_dotnet);
        // Python's `quote_plus` (and `urlencode`), Go's `url.QueryEscape`: RFC 3986's
        // unreserved set raw, a space as `+`.
        let form_python = form_encoded(raw, b"-._~");
        let json = |escape| json_escaped(secret.expose(), escape);
        let utf16 = |big_endian: bool| {
            let mut out = Zeroizing::new(Vec::with_capacity(2 * raw.len()));
            for unit in secret.expose().encode_utf16() {
                out.extend(if big_endian {
                    unit.to_be_bytes()
                } else {
                    unit.to_le_bytes()
                });
            }
            out
        };
        // The raw value always; an encoded form when it differs and is long enough not to match
        // by chance.
        let mut reflections = vec![Zeroizing::new(raw.to_vec())];
        for form in [
            base64(&STANDARD_NO_PAD, 0),
            base64(&URL_SAFE_NO_PAD, 0),
            base64(&STANDARD_NO_PAD, 1),
            base64(&URL_SAFE_NO_PAD, 1),
            base64(&STANDARD_NO_PAD, 2),
            base64(&URL_SAFE_NO_PAD, 2),
            percent,
            percent_lower,
            python_quote,
            js_component,
            js_uri,
            js_escape,
            form_java,
            form_php,
            form_dotnet,
            form_dotnet_lower,
            form_python,
            json(JsonEscape::Minimal),
            json(JsonEscape::Slash),
            json(JsonEscape::Ascii),
            json(JsonEscape::HtmlGo),
            json(JsonEscape::HtmlGson),
            utf16(false),
            utf16(true),
        ] {
            if form.len() >= 4 && !reflections.iter().any(|r| r.as_slice() == form.as_slice()) {
                reflections.push(form);
            }
        }
        let breaks = breaks_of(raw, &reflections);
        let key_len = match_len(raw.len());
        let keys = || reflections.iter().flat_map(|r| keys_of(r, key_len));
        CredentialValue {
            key_len,
            starts: StartSet::of(keys(), false),
            starts_folded: StartSet::of(keys(), true),
            folded: Zeroizing::new(raw.to_ascii_lowercase()),
            secret,
            // (Of the parts matched on: a byte there is in every occurrence, cut or whole.)
            reflection_gates: reflections
                .iter()
                .map(|r| keys_of(r, key_len).map(gate_of))
                .collect(),
            breaks,
            reflections,
        }
    }

    pub fn secret(&self) -> &Secret {
        &self.secret
    }

    /// What a response must not carry back to the agent (raw, base64, percent-encoded, inside
    /// a JSON string).
    pub fn reflections(&self) -> &[zeroize::Zeroizing<Vec<u8>>] {
        &self.reflections
    }

    /// `gate_of` each reflection's head and tail keys, in the same order.
    pub fn reflection_gates(&self) -> &[[Option<u8>; 2]] {
        &self.reflection_gates
    }

    /// How long every spelling's keys are (`keys_of`).
    pub fn key_len(&self) -> usize {
        self.key_len
    }

    /// Which bytes no reflection holds.
    pub fn breaks(&self) -> Breaks {
        self.breaks
    }

    /// Whether `hay` may have four bytes in a row that begin a reflection's key (else no
    /// occurrence of any, whole or cut short, is in it). One pass over `hay`: for short texts.
    pub fn may_begin_in(&self, hay: &[u8]) -> bool {
        self.starts.any_in(hay)
    }

    /// The same for a lowercased text (a header name).
    pub fn may_begin_in_folded(&self, hay: &[u8]) -> bool {
        self.starts_folded.any_in(hay)
    }
}

/// The class of `raw`'s breaks, checked against the spellings actually derived (a class a
/// spelling breaks falls back to the next).
fn breaks_of(raw: &[u8], reflections: &[zeroize::Zeroizing<Vec<u8>>]) -> Breaks {
    let printable = raw.iter().all(|&b| b == b'\t' || (0x20..0x7f).contains(&b));
    [Breaks::NotPrintable, Breaks::LineBreaks]
        .into_iter()
        .filter(|&class| class != Breaks::NotPrintable || printable)
        .find(|&class| {
            reflections
                .iter()
                .all(|r| !r.iter().any(|&b| class.is_break(b)))
        })
        .unwrap_or(Breaks::None)
}

/// How JSON encoders write a string: the minimum (serde_json, Go's `Encoder` with HTML
/// escaping off), also `\/` (PHP's `json_encode`), also non-ASCII as `\uXXXX` (Python's
/// `json.dumps`), or HTML-safe: `<>&` as `\u003c` … (Go's `json.Marshal`, by default) and
/// also `='` (Gson, by default; `=` ends most base64 keys).
#[derive(Clone, Copy, PartialEq)]
enum JsonEscape {
    Minimal,
    Slash,
    Ascii,
    HtmlGo,
    HtmlGson,
}

impl JsonEscape {
    /// Whether an ASCII character this encoder writes as `\uXXXX` (beyond the controls).
    fn html_escapes(self, c: char) -> bool {
        match self {
            JsonEscape::HtmlGo => matches!(c, '<' | '>' | '&'),
            JsonEscape::HtmlGson => matches!(c, '<' | '>' | '&' | '=' | '\''),
            _ => false,
        }
    }
}

/// `value` as it appears inside a JSON string written with `escape`.
fn json_escaped(value: &str, escape: JsonEscape) -> zeroize::Zeroizing<Vec<u8>> {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(value.len() * 6));
    let mut units = [0u16; 2];
    let mut unicode = |c: char, out: &mut Vec<u8>| {
        for unit in c.encode_utf16(&mut units).iter() {
            out.extend_from_slice(b"\\u");
            for shift in [12, 8, 4, 0] {
                out.push(HEX[usize::from((unit >> shift) & 15)]);
            }
        }
    };
    for c in value.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '/' if escape == JsonEscape::Slash => out.extend_from_slice(b"\\/"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if (c as u32) < 0x20
                || (!c.is_ascii() && escape == JsonEscape::Ascii)
                || escape.html_escapes(c)
                // Go and Gson escape the two JavaScript line separators as well.
                || (matches!(c, '\u{2028}' | '\u{2029}')
                    && matches!(escape, JsonEscape::HtmlGo | JsonEscape::HtmlGson)) =>
            {
                unicode(c, &mut out)
            }
            c => {
                let mut utf8 = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
            }
        }
    }
    out
}

/// RFC 3986 percent-encoding of everything but unreserved characters.
pub(super) fn percent_encode(s: &str) -> String {
    let mut out = Vec::with_capacity(s.len() * 3);
    percent_encode_into(s.as_bytes(), is_unreserved, &mut out);
    // Only ASCII was pushed.
    String::from_utf8(out).unwrap_or_default()
}

/// RFC 3986's unreserved characters: never percent-encoded.
pub(super) fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Appends `bytes` percent-encoded (uppercase hex, UTF-8 bytes one by one) but for those
/// `keep` leaves raw.
pub(super) fn percent_encode_into(bytes: &[u8], keep: impl Fn(u8) -> bool, out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for &b in bytes {
        if keep(b) {
            out.push(b);
        } else {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
        }
    }
}

/// `value` as JavaScript's legacy `escape()` writes it: ASCII letters, digits and `@*_+-./`
/// raw, other characters below U+0100 as `%XX`, the rest as `%uXXXX` per UTF-16 unit.
fn js_escape(value: &str) -> zeroize::Zeroizing<Vec<u8>> {
    use std::io::Write as _;
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(value.len() * 6));
    let mut units = [0u16; 2];
    for c in value.chars() {
        match u32::from(c) {
            n if n < 0x80 && (c.is_ascii_alphanumeric() || "@*_+-./".contains(c)) => {
                out.push(n as u8)
            }
            n if n < 0x100 => {
                let _ = write!(out, "%{n:02X}");
            }
            _ => {
                for unit in c.encode_utf16(&mut units).iter() {
                    let _ = write!(out, "%u{unit:04X}");
                }
            }
        }
    }
    out
}

/// A percent-encoded text with its `%XX` digits in lowercase, everything else as it is.
fn lowercase_hex_digits(encoded: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(encoded.to_vec());
    let mut i = 0;
    while let Some(at) = out.get(i..).and_then(|rest| memchr::memchr(b'%', rest)) {
        let start = i + at + 1;
        for b in out.iter_mut().skip(start).take(2) {
            b.make_ascii_lowercase();
        }
        i = start + 2;
    }
    out
}

/// `bytes` as an encoder that leaves `keep` raw writes them, in a buffer that wipes itself.
fn percent_encoded(bytes: &[u8], keep: impl Fn(u8) -> bool) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(bytes.len() * 3));
    percent_encode_into(bytes, keep, &mut out);
    out
}

/// `bytes` form-encoded: a space as `+`, `keep` and ASCII letters and digits raw, the rest
/// `%XX` (uppercase hex, UTF-8 bytes one by one).
fn form_encoded(bytes: &[u8], keep: &[u8]) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(Vec::with_capacity(bytes.len() * 3));
    for &b in bytes {
        if b == b' ' {
            out.push(b'+');
        } else {
            percent_encode_into(
                &[b],
                |b| b.is_ascii_alphanumeric() || keep.contains(&b),
                &mut out,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine as _;

    #[test]
    fn reflections_cover_percent_and_json_spellings() {
        // Lowercase hex digits leave the value's own capitals alone.
        let capitals = CredentialValue::new(Secret::new("AK/Q9=".into()));
        assert!(capitals
            .reflections()
            .iter()
            .any(|r| r.as_slice() == b"AK%2fQ9%3d"));
        let value = CredentialValue::new(Secret::new("k/y\"é+1".into()));
        let forms: Vec<String> = value
            .reflections()
            .iter()
            .map(|r| String::from_utf8_lossy(r).into_owned())
            .collect();
        for want in [
            "k/y\"é+1",           // raw
            "k%2Fy%22%C3%A9%2B1", // percent, RFC 3986
            "k%2fy%22%c3%a9%2b1", // percent, lowercase hex
            "k/y%22%C3%A9%2B1",   // Python's urllib.parse.quote (keeps `/`)
            "k/y%22%C3%A9+1",     // JavaScript's encodeURI() (keeps `/` and `+`)
            "k/y%22%E9+1",        // JavaScript's escape() (Latin-1 as %XX)
            "k/y\\\"é+1",         // JSON (serde_json, Go)
            "k\\/y\\\"é+1",       // JSON with \/ (PHP)
            "k/y\\\"\\u00e9+1",   // JSON, ASCII only (Python)
        ] {
            assert!(forms.iter().any(|f| f == want), "{want} not in {forms:?}");
        }
        // Form encoders and HTML-safe JSON encoders, on a base64 key and on a key of symbols.
        for (secret, want) in [
            (
                "tok/with+slash=and~tilde!Q9x",
                "tok%2Fwith%2Bslash%3Dand%7Etilde%21Q9x",
            ), // Java URLEncoder, WHATWG, PHP urlencode
            (
                "tok/with+slash=and~tilde!Q9x",
                "tok%2fwith%2bslash%3dand%7etilde!Q9x",
            ), // .NET HttpUtility
            (
                "tok/with+slash=and~tilde!Q9x",
                "tok%2Fwith%2Bslash%3Dand%7Etilde!Q9x",
            ), // .NET WebUtility
            (
                "tok/with+slash=and~tilde!Q9x",
                "tok/with+slash\\u003dand~tilde!Q9x",
            ), // Gson
            (
                "Q8~a&b<c>x*y!z'(1)_9",
                "Q8~a\\u0026b\\u003cc\\u003ex*y!z'(1)_9",
            ), // Go json.Marshal
            (
                "Q8~a&b<c>x*y!z'(1)_9",
                "Q8~a\\u0026b\\u003cc\\u003ex*y!z\\u0027(1)_9",
            ), // Gson
            (
                "Q8~a&b<c>x*y!z'(1)_9",
                "Q8%7Ea%26b%3Cc%3Ex*y%21z%27%281%29_9",
            ), // Java URLEncoder
            (
                "Q8~a&b<c>x*y!z'(1)_9",
                "Q8%7Ea%26b%3Cc%3Ex%2Ay%21z%27%281%29_9",
            ), // PHP urlencode
            ("Q8~a&b<c>x*y!z'(1)_9", "Q8%7ea%26b%3cc%3ex*y!z%27(1)_9"), // .NET HttpUtility
            ("key with space", "key+with+space"),                       // form encoding
            ("a<b c~d", "a%3Cb+c~d"), // Python's quote_plus, Go's QueryEscape
        ] {
            let value = CredentialValue::new(Secret::new(secret.into()));
            assert!(
                value
                    .reflections()
                    .iter()
                    .any(|r| r.as_slice() == want.as_bytes()),
                "{want} not a reflection of {secret}"
            );
        }
        // A plain token differs from itself only in base64, and in UTF-16 (NUL bytes between).
        let plain = CredentialValue::new(Secret::new("sk_live_0123456789".into()));
        assert!(plain
            .reflections()
            .iter()
            .skip(1)
            .all(|r| !r.contains(&b'_') || r.contains(&0)));
        let forms: Vec<&[u8]> = plain.reflections().iter().map(|r| r.as_slice()).collect();
        for want in [
            &b"s\0k\0_\0l\0i\0v\0e\0_\x000\x001\x002\x003\x004\x005\x006\x007\x008\x009\0"[..],
            b"\0s\0k\0_\0l\0i\0v\0e\0_\x000\x001\x002\x003\x004\x005\x006\x007\x008\x009",
        ] {
            assert!(
                forms.contains(&want),
                "{} not a reflection",
                String::from_utf8_lossy(want)
            );
        }
    }

    #[test]
    fn base64_of_any_text_holding_the_value_contains_a_reflection() {
        use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
        for secret in ["sk_live_0123456789", "k/y\"é+1", "SECRETAAAA1111", "abcd"] {
            let value = CredentialValue::new(Secret::new(secret.into()));
            for prefix in ["", "B", "Be", "Bea", "Bearer ", "x:", "{\"token\":\""] {
                for suffix in ["", "!", "\"}", "\r\n"] {
                    let text = format!("{prefix}{secret}{suffix}");
                    for engine in [&STANDARD, &URL_SAFE, &URL_SAFE_NO_PAD] {
                        let encoded = engine.encode(&text);
                        assert!(
                            value.reflections().iter().any(|r| encoded
                                .as_bytes()
                                .windows(r.len())
                                .any(|w| w == r.as_slice())),
                            "base64 of {text:?} ({encoded}) holds no reflection of {secret:?}"
                        );
                    }
                }
            }
        }
    }
}
