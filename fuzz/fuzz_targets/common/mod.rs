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
    for bad in ["%2F", "%5C", "%25", "%3B"] {
        if upper.contains(bad) {
            return Some("encoded separator or percent");
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
    None
}
