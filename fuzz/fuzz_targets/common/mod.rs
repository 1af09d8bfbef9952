//! Reference models shared by the fuzz targets: a naive route matcher and an independent scan
//! of a raw request target for the ambiguous forms of SPEC §4.4. Written to be obviously
//! right rather than fast, and without reusing keyward's own helpers, so that the fuzzers
//! compare two readings of the spec instead of one reading with itself.

#![allow(dead_code)] // each target uses a subset

use keyward::matcher::{CanonPath, PatternSegment, RoutePattern};

/// Segment ranges of the captures when `pattern`'s path matches the canonical segments `segs`:
/// a literal equals its segment, `{name}` takes one non-empty segment, `{*name}` takes one or
/// more segments starting with a non-empty one, and nothing may be left over.
pub fn reference_match(pattern: &RoutePattern, segs: &[&str]) -> Option<Vec<(usize, usize)>> {
    let mut caps = Vec::new();
    let mut i = 0;
    for seg in &pattern.segments {
        match seg {
            PatternSegment::Literal(l) => {
                if segs.get(i).copied() != Some(&**l) {
                    return None;
                }
                i += 1;
            }
            PatternSegment::Param(_) => {
                if segs.get(i).is_none_or(|s| s.is_empty()) {
                    return None;
                }
                caps.push((i, i + 1));
                i += 1;
            }
            PatternSegment::Rest(_) => {
                if segs.get(i).is_none_or(|s| s.is_empty()) {
                    return None;
                }
                caps.push((i, segs.len()));
                i = segs.len();
            }
        }
    }
    (i == segs.len()).then_some(caps)
}

/// The canonical segments of `path` as owned strings.
pub fn segments(path: &CanonPath) -> Vec<&str> {
    path.segments().collect()
}

/// Why a raw target must have been refused, by a scan that shares no code with
/// `canonicalize`; `None` when nothing ambiguous is found.
pub fn ambiguous_form(target: &str) -> Option<&'static str> {
    let path = target.split('?').next().unwrap_or("");
    if !path.starts_with('/') {
        return Some("not origin form");
    }
    if target.contains('#') {
        return Some("fragment");
    }
    if target.bytes().any(|b| b < 0x21 || b == 0x7f) {
        return Some("control byte");
    }
    if path.bytes().any(|b| b >= 0x80) {
        return Some("non-ASCII");
    }
    if path.contains('\\') {
        return Some("backslash");
    }
    if path.contains(';') {
        return Some("semicolon");
    }
    let upper = path.to_ascii_uppercase();
    for bad in ["%2F", "%5C", "%25", "%3B", "%3F", "%23"] {
        if upper.contains(bad) {
            return Some("encoded separator, percent, `?` or `#`");
        }
    }
    let bytes = path.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'%' {
            let hex = |j: usize| bytes.get(j).is_some_and(|h| h.is_ascii_hexdigit());
            if !(hex(i + 1) && hex(i + 2)) {
                return Some("malformed percent");
            }
            let first = bytes.get(i + 1).copied().unwrap_or(b'0');
            // %00-%1F and %7F
            if first == b'0' || first == b'1' || upper.get(i..i + 3) == Some("%7F") {
                return Some("encoded control byte");
            }
        }
    }
    // `//` anywhere, or an empty segment other than one trailing `/` (which "//" covers).
    if path.contains("//") {
        return Some("empty segment");
    }
    for seg in path.split('/').skip(1) {
        // %2E in either case is '.'
        let decoded = seg.replace("%2e", ".").replace("%2E", ".");
        if decoded == "." || decoded == ".." {
            return Some("dot segment");
        }
    }
    // Each segment fully percent-decoded must be UTF-8 (no overlong forms) without a
    // character that normalizes to `. / \ ; % ? #`.
    for seg in path.split('/').skip(1) {
        let raw = seg.as_bytes();
        let mut decoded = Vec::with_capacity(raw.len());
        let mut i = 0;
        while i < raw.len() {
            if raw[i] == b'%' {
                let hex = std::str::from_utf8(&raw[i + 1..i + 3]).unwrap_or("00");
                decoded.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                i += 3;
            } else {
                decoded.push(raw[i]);
                i += 1;
            }
        }
        match std::str::from_utf8(&decoded) {
            Err(_) => return Some("invalid UTF-8"),
            Ok(text) if text.chars().any(normalizes_to_structure) => return Some("lookalike"),
            Ok(_) => {}
        }
    }
    None
}

/// Characters whose NFKC (or best-fit) form holds `. / \ ; % ? #`, listed independently of
/// the matcher's table.
fn normalizes_to_structure(c: char) -> bool {
    const LIST: &[(u32, u32)] = &[
        (0xFF03, 0xFF03),
        (0xFF05, 0xFF05),
        (0xFF0E, 0xFF0F),
        (0xFF1B, 0xFF1B),
        (0xFF1F, 0xFF1F),
        (0xFF3C, 0xFF3C),
        (0xFE52, 0xFE52),
        (0xFE54, 0xFE54),
        (0xFE56, 0xFE56),
        (0xFE5F, 0xFE5F),
        (0xFE68, 0xFE68),
        (0xFE6A, 0xFE6A),
        (0x2024, 0x2026),
        (0x037E, 0x037E),
        (0x2100, 0x2101),
        (0x2105, 0x2106),
        (0x2488, 0x249B),
        (0x1F100, 0x1F10A),
        (0x33C2, 0x33C2),
        (0x33C7, 0x33C7),
        (0x33D8, 0x33D8),
        (0x2044, 0x2044),
        (0x2215, 0x2215),
        (0x29F8, 0x29F8),
        (0x2216, 0x2216),
        (0x29F5, 0x29F5),
        (0x00AD, 0x00AD),
        (0x034F, 0x034F),
        (0x180E, 0x180E),
        (0x200B, 0x200F),
        (0x202A, 0x202E),
        (0x2060, 0x2064),
        (0xFEFF, 0xFEFF),
    ];
    let c = u32::from(c);
    LIST.iter().any(|&(lo, hi)| (lo..=hi).contains(&c))
}
