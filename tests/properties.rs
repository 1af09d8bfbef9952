//! Property tests at the crate boundary, each against a model written here without keyward's
//! helpers: (a) `canonicalize` never panics and accepts nothing SPEC §4.4 calls ambiguous;
//! (b) canonicalize-then-`Router::find` finds exactly the routes a naive matcher over a
//! naively decoded path finds; (c) `policy::parse` never panics on mutations of the example
//! policy and reports its errors as `file:line:column: ...`, sorted by position; (d) the
//! response redactor, over any body cut into any frames, lets no reflection of the credential
//! through, changes nothing else, and releases the same number of bytes whatever they are.
//!
//! Bounded (256 cases each) so the file runs in a few seconds; the fuzz targets in `fuzz/`
//! explore the same ground without bounds.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;

use keyward::matcher::canon::{canonicalize, MAX_PATH_BYTES, MAX_SEGMENTS};
use keyward::matcher::{PatternSegment, RoutePattern, Router};
use keyward::policy;
use proptest::prelude::*;

const CASES: u32 = 256;

// ---------------------------------------------------------------------------------------------
// (a) canonicalize

/// Why `target` is ambiguous by SPEC §4.4, by a plain scan of the raw string; `None` when it
/// is not.
fn ambiguous_form(target: &str) -> Option<&'static str> {
    let path = match target.find('?') {
        Some(q) => &target[..q],
        None => target,
    };
    if !path.starts_with('/') {
        return Some("not origin form");
    }
    if target.contains('#') {
        return Some("fragment");
    }
    if target.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Some("control byte or space");
    }
    if !path.is_ascii() {
        return Some("non-ASCII");
    }
    if path.contains('\\') || path.contains(';') {
        return Some("backslash or semicolon");
    }
    let upper = path.to_ascii_uppercase();
    if ["%2F", "%5C", "%25", "%3B", "%3F", "%23"]
        .iter()
        .any(|e| upper.contains(e))
    {
        return Some("encoded separator, percent, semicolon, `?` or `#`");
    }
    let b = upper.as_bytes();
    for i in 0..b.len() {
        if b[i] != b'%' {
            continue;
        }
        let (Some(&h), Some(&l)) = (b.get(i + 1), b.get(i + 2)) else {
            return Some("malformed percent");
        };
        if !h.is_ascii_hexdigit() || !l.is_ascii_hexdigit() {
            return Some("malformed percent");
        }
        if h == b'0' || h == b'1' || (h == b'7' && l == b'F') {
            return Some("encoded control byte");
        }
    }
    if path.contains("//") {
        return Some("empty segment");
    }
    // Dots alone (`.`, `..`, `...`), or padded with blanks (`..%20`, `%C2%A0.`).
    let dots = path.split('/').any(|s| {
        let s = s
            .to_ascii_uppercase()
            .replace("%2E", ".")
            .replace("%20", " ")
            .replace("%C2%A0", " ");
        let inner = s.trim_matches(' ');
        !inner.is_empty() && inner.chars().all(|c| c == '.' || c == ' ')
    });
    if dots {
        return Some("dot segment");
    }
    // Each segment percent-decoded must be UTF-8 (no overlong forms), without a character
    // that normalizes to a separator or dot (the few in the generator below).
    for seg in path.split('/') {
        let mut bytes = Vec::new();
        let mut i = 0;
        let raw = seg.as_bytes();
        while i < raw.len() {
            if raw[i] == b'%' {
                bytes.push(u8::from_str_radix(&seg[i + 1..i + 3], 16).unwrap());
                i += 3;
            } else {
                bytes.push(raw[i]);
                i += 1;
            }
        }
        match std::str::from_utf8(&bytes) {
            Err(_) => return Some("invalid UTF-8"),
            Ok(text) if text.contains(|c| matches!(c, '\u{80}'..='\u{9F}')) => {
                return Some("encoded C1 control")
            }
            Ok(text) if text.contains(['\u{FF0E}', '\u{FF0F}', '\u{2024}']) => {
                return Some("lookalike")
            }
            Ok(_) => {}
        }
    }
    None
}

fn within_limits(target: &str) -> bool {
    let path = target.split('?').next().unwrap_or("");
    path.len() <= MAX_PATH_BYTES && path.matches('/').count() <= MAX_SEGMENTS
}

/// Targets built from the pieces every ambiguity is made of, mixed into ordinary path text
/// (mostly ordinary, so that about half the targets are accepted).
fn tricky_target() -> impl Strategy<Value = String> {
    let ordinary = prop::sample::select(vec![
        "/",
        "/",
        "a",
        "repos",
        "acme",
        "...",
        ".a",
        "%7e",
        "%41",
        "%2e%2e%2e",
        "%20",
        "%c2%a0",
        "%C3%A9",
        "~",
        "-",
        "_",
        "{",
        "*",
        ":",
        "@",
        "=",
        "&",
    ]);
    let ambiguous = prop::sample::select(vec![
        "/",
        ".",
        "..",
        "/.",
        "/..",
        "/%2e",
        "/.%2E",
        "%2e",
        "%2f",
        "%2F",
        "%5c",
        "%5C",
        "%25",
        "%3b",
        "%3B",
        "%3f",
        "%23",
        "%00",
        "%0A",
        "%1f",
        "%7F",
        "%",
        "%4",
        "%g0",
        ";",
        "\\",
        "#",
        "?",
        " ",
        "\t",
        "\u{7f}",
        "\u{e9}",
        "%C0%AE",
        "%C2%85",
        "%c0%2e",
        "%C3",
        "%EF%BC%8E",
        "%ef%bc%8f",
        "%E2%80%A4",
    ]);
    let piece = prop_oneof![10 => ordinary, 1 => ambiguous];
    (
        prop::collection::vec(piece, 0..14),
        prop::bool::weighted(0.9),
    )
        .prop_map(|(pieces, slash)| {
            let body = pieces.concat();
            if slash {
                format!("/{body}")
            } else {
                body
            }
        })
}

fn check_canonicalize(target: &str) -> Result<(), TestCaseError> {
    let scan = ambiguous_form(target);
    match canonicalize(target) {
        Ok(path) => {
            prop_assert_eq!(scan, None, "{:?} accepted", target);
            let raw = target.split('?').next().unwrap_or("");
            prop_assert_eq!(path.raw_path(), raw);
            let segs: Vec<&str> = path.segments().collect();
            for (i, s) in segs.iter().enumerate() {
                prop_assert!(*s != "." && *s != "..", "{:?}", target);
                prop_assert!(!s.is_empty() || i + 1 == segs.len(), "{:?}", target);
            }
        }
        Err(_) => prop_assert!(
            scan.is_some() || !within_limits(target),
            "{:?} refused but the scan finds nothing ambiguous",
            target
        ),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn canonicalize_never_panics_on_any_string(s in any::<String>()) {
        check_canonicalize(&s)?;
        check_canonicalize(&format!("/{s}"))?;
    }

    #[test]
    fn canonicalize_refuses_exactly_the_ambiguous_forms(target in tricky_target()) {
        check_canonicalize(&target)?;
    }
}

// ---------------------------------------------------------------------------------------------
// (b) canonicalize, then route matching

/// Literal segments routes are written with; requests spell the same ones, sometimes encoded.
const LITERALS: [&str; 5] = ["a", "b", "ab", "A", "x-y"];

/// Segments of request paths: the literals, percent-encoded unreserved spellings of them (which
/// canonicalization decodes), and one more that no route names.
const PATH_SEGMENTS: [&str; 13] = [
    "a", "b", "ab", "A", "x-y", "%61", "%62", "%61b", "a%62", "%41", "x%2Dy", "x%2dy", "z",
];

#[derive(Clone, Debug)]
enum Seg {
    Lit(&'static str),
    Param,
}

fn route_text() -> impl Strategy<Value = String> {
    let seg = prop_oneof![
        3 => prop::sample::select(LITERALS.to_vec()).prop_map(Seg::Lit),
        2 => Just(Seg::Param),
    ];
    let end = prop::sample::select(vec!["", "", "/", "/{*rest}"]);
    let methods = prop::sample::select(vec!["GET", "POST", "GET|HEAD"]);
    (methods, prop::collection::vec(seg, 0..4), end).prop_map(|(m, segs, end)| {
        let mut path = String::new();
        for (i, s) in segs.iter().enumerate() {
            match s {
                Seg::Lit(l) => path.push_str(&format!("/{l}")),
                Seg::Param => path.push_str(&format!("/{{p{i}}}")),
            }
        }
        match (path.is_empty(), end) {
            (true, "/{*rest}") => format!("{m} /{{*rest}}"),
            (true, _) => format!("{m} /"),
            (false, end) => format!("{m} {path}{end}"),
        }
    })
}

fn path_text() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop::sample::select(PATH_SEGMENTS.to_vec()), 0..6),
        any::<bool>(),
        prop::sample::select(vec!["", "?", "?q=%2F..", "?a=1&b=/"]),
    )
        .prop_map(|(segs, trailing, query)| {
            let mut t: String = segs.iter().map(|s| format!("/{s}")).collect();
            if trailing || t.is_empty() {
                t.push('/');
            }
            format!("{t}{query}")
        })
}

/// The segments a server sees: the path split on `/`, `%XX` decoded (only unreserved
/// characters are generated, so decoding is always the right reading).
fn model_segments(target: &str) -> Vec<String> {
    let path = target.split('?').next().unwrap_or("");
    if path == "/" {
        return Vec::new();
    }
    path[1..]
        .split('/')
        .map(|seg| {
            let mut out = String::new();
            let mut rest = seg;
            while let Some(i) = rest.find('%') {
                out.push_str(&rest[..i]);
                let byte = u8::from_str_radix(&rest[i + 1..i + 3], 16).unwrap();
                out.push(char::from(byte));
                rest = &rest[i + 3..];
            }
            out.push_str(rest);
            out
        })
        .collect()
}

/// Captures as segment ranges when the route's path matches `segs`.
fn model_match(route: &RoutePattern, segs: &[String]) -> Option<Vec<(usize, usize)>> {
    let mut caps = Vec::new();
    for (i, p) in route.segments.iter().enumerate() {
        let seg = segs.get(i)?;
        match p {
            PatternSegment::Literal(l) if **l == **seg => {}
            PatternSegment::Literal(_) => return None,
            PatternSegment::Param(_) if !seg.is_empty() => caps.push((i, i + 1)),
            PatternSegment::Rest(_) if !seg.is_empty() => {
                caps.push((i, segs.len()));
                return Some(caps);
            }
            PatternSegment::Param(_) | PatternSegment::Rest(_) => return None,
        }
    }
    (route.segments.len() == segs.len()).then_some(caps)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn route_matching_agrees_with_a_naive_model(
        routes in prop::collection::vec(route_text(), 1..10),
        targets in prop::collection::vec(path_text(), 1..6),
    ) {
        let patterns: Vec<RoutePattern> = routes
            .iter()
            .map(|t| RoutePattern::parse(t).unwrap_or_else(|e| panic!("{t:?}: {e}")))
            .collect();
        let mut router = Router::new();
        for (i, p) in patterns.iter().enumerate() {
            router.insert(p, i);
        }
        let mut out = Vec::new();
        for target in &targets {
            let path = canonicalize(target).unwrap_or_else(|e| panic!("{target:?}: {e}"));
            let segs = model_segments(target);
            prop_assert!(path.segments().eq(segs.iter().map(String::as_str)), "{:?}", target);

            out.clear();
            router.find(&path, &mut out);
            let got: Vec<(usize, Vec<(usize, usize)>)> = out
                .iter()
                .map(|m| {
                    let caps = (0..m.captures.len()).map(|k| m.captures.get(k).unwrap());
                    (*m.value, caps.collect())
                })
                .collect();
            let want: Vec<(usize, Vec<(usize, usize)>)> = patterns
                .iter()
                .enumerate()
                .filter_map(|(i, p)| model_match(p, &segs).map(|c| (i, c)))
                .collect();
            prop_assert_eq!(got, want, "{:?} against {:?}", target, routes);

            for m in &out {
                for k in 0..m.captures.len() {
                    let (s, e) = m.captures.get(k).unwrap();
                    let value = m.captures.value(k, &path).unwrap();
                    prop_assert_eq!(value, segs[s..e].join("/"));
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// (c) policy parsing

const EXAMPLE: &str = include_str!("../policy/example.yaml");

#[derive(Clone, Debug)]
enum Mutation {
    Delete(usize),
    Duplicate(usize),
    Swap(usize, usize),
    /// Insert `key: value` with this indentation before line `at`.
    InsertKey {
        at: usize,
        indent: usize,
        key: &'static str,
        value: &'static str,
    },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    // Indices are taken modulo the line count when applied.
    let idx = 0usize..1000;
    let key = prop::sample::select(vec![
        "listen",
        "token",
        "source",
        "hosts",
        "inject",
        "routes",
        "risk",
        "service",
        "agents",
        "credentials",
        "capabilities",
        "bogus",
        "max_ttl",
        "passthrough",
        "port",
        "scheme",
    ]);
    let value = prop::sample::select(vec![
        "",
        "x",
        "1",
        "-1",
        "true",
        "[]",
        "{}",
        "[a, b]",
        "env:X",
        "'GET /a/{id}'",
        "1h",
        "127.0.0.1:0",
        "{source: env:Y}",
        "[GET /a/{x}]",
        "\"${credential}\"",
        "&anchor 1",
    ]);
    prop_oneof![
        idx.clone().prop_map(Mutation::Delete),
        idx.clone().prop_map(Mutation::Duplicate),
        (idx.clone(), idx.clone()).prop_map(|(a, b)| Mutation::Swap(a, b)),
        (idx, 0usize..4, key, value).prop_map(|(at, level, key, value)| Mutation::InsertKey {
            at,
            indent: 2 * level,
            key,
            value
        }),
    ]
}

fn mutate(text: &str, mutations: &[Mutation]) -> String {
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    for m in mutations {
        let n = lines.len().max(1);
        match *m {
            Mutation::Delete(i) if !lines.is_empty() => {
                lines.remove(i % n);
            }
            Mutation::Duplicate(i) if !lines.is_empty() => {
                let line = lines[i % n].clone();
                lines.insert(i % n, line);
            }
            Mutation::Swap(a, b) if !lines.is_empty() => lines.swap(a % n, b % n),
            Mutation::InsertKey {
                at,
                indent,
                key,
                value,
            } => lines.insert(
                at % (lines.len() + 1),
                format!("{}{key}: {value}", " ".repeat(indent)),
            ),
            _ => {}
        }
    }
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

fn check_policy(text: &str) -> Result<(), TestCaseError> {
    let errs = match policy::parse("example.yaml", text, Path::new("/etc/keyward")) {
        Ok(_) => return Ok(()),
        Err(errs) => errs,
    };
    prop_assert!(!errs.0.is_empty());
    for e in &errs.0 {
        prop_assert!(e.line >= 1 && e.column >= 1, "{:?}", e);
        let shown = e.to_string();
        let prefix = format!("example.yaml:{}:{}: ", e.line, e.column);
        prop_assert!(shown.starts_with(&prefix), "{:?}", shown);
        prop_assert!(shown.len() > prefix.len(), "no message: {:?}", shown);
    }
    let positions: Vec<(usize, usize)> = errs.0.iter().map(|e| (e.line, e.column)).collect();
    let mut sorted = positions.clone();
    sorted.sort_unstable();
    prop_assert_eq!(positions, sorted, "errors not sorted:\n{}", errs);
    Ok(())
}

#[test]
fn the_unmutated_example_parses() {
    if let Err(e) = policy::parse("example.yaml", EXAMPLE, Path::new("/etc/keyward")) {
        panic!("{e}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn policy_parse_survives_mutations_of_the_example(
        mutations in prop::collection::vec(mutation(), 1..4),
    ) {
        check_policy(&mutate(EXAMPLE, &mutations))?;
    }
}

// ---------------------------------------------------------------------------------------------
// (d) the response redactor

const SECRET: &str = "sk/live+Q9=x_7~abc";

/// The spellings of `SECRET` an upstream may reflect, written here without keyward's helpers.
fn reflections() -> Vec<Vec<u8>> {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::STANDARD.encode(SECRET);
    let url64 = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(SECRET);
    vec![
        SECRET.into(),
        b64.trim_end_matches('=').into(),
        url64.into(),
        "sk%2Flive%2BQ9%3Dx_7~abc".into(),
        "sk%2flive%2bQ9%3dx_7~abc".into(),
        "sk/live%2BQ9%3Dx_7~abc".into(),     // Python's quote
        "sk\\/live+Q9=x_7~abc".into(),       // PHP's json_encode
        "sk%2Flive%2BQ9%3Dx_7%7Eabc".into(), // form encoding: Java's URLEncoder, PHP's urlencode
        "sk%2flive%2bQ9%3dx_7%7eabc".into(), // .NET's HttpUtility.UrlEncode
        "sk/live+Q9\\u003dx_7~abc".into(),   // Gson's HTML-safe JSON
    ]
}

/// A body of filler words and reflections, as (text, whether a reflection is in it).
fn body() -> impl Strategy<Value = Vec<u8>> {
    let piece = prop_oneof![
        3 => "[a-z0-9 ./+%=:\"-]{0,40}".prop_map(String::into_bytes),
        1 => (0..reflections().len()).prop_map(|i| reflections()[i].clone()),
    ];
    prop::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Pushes `body` cut at `cuts` (fractions of its length) through a redactor; returns what
/// each frame released and what the end released.
fn redact(body: &[u8], cuts: &[f64]) -> (Vec<Vec<u8>>, Vec<u8>) {
    use keyward::credentials::CredentialValue;
    use keyward::proxy::redact::Redactor;
    use keyward::secret::Secret;
    let value = CredentialValue::new(Secret::new(SECRET.to_string()));
    let mut r = Redactor::new(std::sync::Arc::new(value), None);
    let mut at: Vec<usize> = cuts
        .iter()
        .map(|f| (f * body.len() as f64) as usize)
        .collect();
    at.push(0);
    at.push(body.len());
    at.sort_unstable();
    at.dedup();
    let released = at
        .windows(2)
        .map(|w| {
            r.push(bytes::Bytes::copy_from_slice(&body[w[0]..w[1]]))
                .concat()
        })
        .collect();
    (released, r.finish().to_vec())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, ..ProptestConfig::default() })]

    #[test]
    fn the_redactor_lets_no_reflection_through_and_changes_nothing_else(
        body in body(),
        cuts in prop::collection::vec(0.0f64..1.0, 0..8),
    ) {
        let (frames, end) = redact(&body, &cuts);
        let out = [frames.concat(), end].concat();
        for r in reflections() {
            prop_assert!(!contains(&out, &r), "{:?} let through", String::from_utf8_lossy(&r));
        }
        if !reflections().iter().any(|r| contains(&body, r)) {
            prop_assert_eq!(out, body);
        }
    }

    /// What each frame releases depends on lengths only: the same framing of a body of the
    /// same length without a reflection releases the same number of bytes at each step.
    #[test]
    fn what_each_frame_releases_does_not_depend_on_the_credential(
        body in body(),
        cuts in prop::collection::vec(0.0f64..1.0, 0..8),
    ) {
        prop_assume!(!reflections().iter().any(|r| contains(&body, r)));
        let neutral = vec![b'x'; body.len()];
        let (frames, _) = redact(&body, &cuts);
        let (neutral_frames, _) = redact(&neutral, &cuts);
        let lengths: Vec<usize> = frames.iter().map(Vec::len).collect();
        let neutral_lengths: Vec<usize> = neutral_frames.iter().map(Vec::len).collect();
        prop_assert_eq!(lengths, neutral_lengths);
    }
}
