//! Capability routes: the `METHOD /path/{param}/{*rest}` syntax (SPEC §3), its canonical
//! text for audit records, and the overlap test used by `keyward check`. The trie that matches
//! requests against routes is in `router.rs` (re-exported here).
//!
//! Must never: accept a route that could not match a canonical request path as written (a
//! `%`, a dot segment, an empty segment), or TRACE/TRACK/CONNECT.

use std::fmt;

use http::Method;

use super::canon::{MAX_PATH_BYTES, MAX_SEGMENTS};

// The trie lives in its own file; it is part of this module's interface.
pub use super::router::{Captures, RouteMatch, Router};

/// Most parameters (`{name}` and `{*name}`) one route may have; [`Captures`] stores this many
/// inline so a match never allocates.
pub const MAX_PARAMS: usize = 8;

/// One segment of a route's path.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PatternSegment {
    /// Compared byte for byte with the canonical request segment. Only the empty string when
    /// it is the final segment of a route written with a trailing `/`.
    Literal(Box<str>),
    /// `{name}`: exactly one non-empty segment.
    Param(Box<str>),
    /// `{*name}`: one or more remaining segments; always the last pattern segment.
    Rest(Box<str>),
}

/// A parsed route: `GET|HEAD /repos/{owner}/{repo}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RoutePattern {
    /// In written order, no duplicates, never TRACE, TRACK or CONNECT.
    pub methods: Vec<Method>,
    /// Path segments after the leading `/`; empty for the route `/`.
    pub segments: Vec<PatternSegment>,
}

/// Why a route's text is not a valid route. Display says what is wrong and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSyntaxError {
    message: String,
}

impl RouteSyntaxError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The one-line explanation (same as Display).
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for RouteSyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for RouteSyntaxError {}

/// Methods a route may never name: TRACE/TRACK echo requests (credentials included) back to
/// the agent, and CONNECT is handled by the proxy itself, never forwarded (SPEC §4.5).
const FORBIDDEN_METHODS: [&str; 3] = ["TRACE", "TRACK", "CONNECT"];

impl RoutePattern {
    /// Parses `METHODS PATH`, e.g. `GET /repos/{owner}/{repo}` or `GET|HEAD /x/{*rest}`.
    ///
    /// METHODS: one or more uppercase tokens joined by `|`, no duplicates, never TRACE, TRACK
    /// or CONNECT. Exactly one space before PATH. PATH starts with `/`; literal segments use
    /// unreserved characters, sub-delims except `;` and `*`, `:` and `@` — written as the
    /// request's canonical form is, so never percent-encoded; no `.`/`..` segments, no empty
    /// segment except one trailing `/`; `{name}` is a whole segment, `{*name}` only last;
    /// names are `[A-Za-z_][A-Za-z0-9_]*`, unique within the route, at most [`MAX_PARAMS`].
    pub fn parse(s: &str) -> Result<RoutePattern, RouteSyntaxError> {
        if s.is_empty() {
            return Err(RouteSyntaxError::new(
                "the route is empty; write `METHOD /path`",
            ));
        }
        let shape_error = || {
            RouteSyntaxError::new(
                "expected `METHOD /path` with exactly one space between method and path, \
                 and no other whitespace",
            )
        };
        let spaces = s.bytes().filter(|&b| b == b' ').count();
        if spaces != 1 || s.chars().any(|c| c.is_whitespace() && c != ' ') {
            return Err(shape_error());
        }
        let (method_part, path) = s.split_once(' ').ok_or_else(shape_error)?;
        let methods = parse_methods(method_part)?;
        let segments = parse_path(path)?;
        Ok(RoutePattern { methods, segments })
    }

    /// Names of `{name}` and `{*name}` segments, in path order. Capture `k` of a
    /// [`RouteMatch`] belongs to the `k`-th name.
    /// The name of the route's `{*name}` parameter (it spans the rest of the path), if any.
    pub fn rest_param(&self) -> Option<&str> {
        self.segments.iter().find_map(|s| match s {
            PatternSegment::Rest(n) => Some(&**n),
            _ => None,
        })
    }

    pub fn param_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.segments.iter().filter_map(|s| match s {
            PatternSegment::Literal(_) => None,
            PatternSegment::Param(n) | PatternSegment::Rest(n) => Some(&**n),
        })
    }

    /// True when some single request (one method and one canonical path) matches both
    /// patterns. Used to refuse policies in which two services could claim one request.
    pub fn overlaps(&self, other: &RoutePattern) -> bool {
        self.methods.iter().any(|m| other.methods.contains(m))
            && paths_overlap(&self.segments, &other.segments)
    }
}

/// Whether one canonical path matches both segment lists. Canonical paths have non-empty
/// segments except possibly a trailing `""`; patterns are built the same way, so the lists
/// can be walked in lockstep until one side reaches a `{*rest}`.
fn paths_overlap(a: &[PatternSegment], b: &[PatternSegment]) -> bool {
    use PatternSegment::{Literal, Param, Rest};
    match (a.split_first(), b.split_first()) {
        (None, None) => true,
        // The other side needs at least one more segment (a `{*rest}` takes one or more).
        (None, Some(_)) | (Some(_), None) => false,
        (Some((Rest(_), _)), Some((first, _))) | (Some((first, _)), Some((Rest(_), _))) => {
            // The rest's first segment must be non-empty; only a trailing literal "" is not.
            !matches!(first, Literal(l) if l.is_empty())
        }
        (Some((x, xs)), Some((y, ys))) => {
            let same_segment = match (x, y) {
                (Literal(l), Literal(m)) => l == m,
                (Literal(l), Param(_)) | (Param(_), Literal(l)) => !l.is_empty(),
                (Param(_), Param(_)) => true,
                // Handled above; kept exhaustive so a new variant must be thought through.
                (Rest(_), _) | (_, Rest(_)) => true,
            };
            same_segment && paths_overlap(xs, ys)
        }
    }
}

fn parse_methods(part: &str) -> Result<Vec<Method>, RouteSyntaxError> {
    if part.is_empty() {
        return Err(RouteSyntaxError::new(
            "the method is missing: write `METHOD /path`",
        ));
    }
    let mut methods: Vec<Method> = Vec::new();
    for tok in part.split('|') {
        if tok.is_empty() {
            return Err(RouteSyntaxError::new(
                "empty method name: methods are joined by `|` with nothing in between, \
                 e.g. `GET|HEAD`",
            ));
        }
        if tok == "*" {
            return Err(RouteSyntaxError::new(
                "`*` is not a method: list the methods joined by `|`, e.g. `GET|HEAD`",
            ));
        }
        let well_formed = tok.as_bytes().first().is_some_and(u8::is_ascii_alphabetic)
            && tok
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !well_formed {
            return Err(RouteSyntaxError::new(format!(
                "`{}` is not a method name: use uppercase letters, digits, `-` or `_`",
                tok.escape_debug()
            )));
        }
        if tok.bytes().any(|b| b.is_ascii_lowercase()) {
            return Err(RouteSyntaxError::new(format!(
                "methods are case-sensitive; write `{}`",
                tok.to_ascii_uppercase()
            )));
        }
        if FORBIDDEN_METHODS.contains(&tok) {
            return Err(RouteSyntaxError::new(format!(
                "method `{tok}` may not appear in a route"
            )));
        }
        let method = Method::from_bytes(tok.as_bytes())
            .map_err(|_| RouteSyntaxError::new(format!("`{tok}` is not a method name")))?;
        if methods.contains(&method) {
            return Err(RouteSyntaxError::new(format!(
                "method `{tok}` is listed twice"
            )));
        }
        methods.push(method);
    }
    Ok(methods)
}

fn parse_path(path: &str) -> Result<Vec<PatternSegment>, RouteSyntaxError> {
    let Some(body) = path.strip_prefix('/') else {
        return Err(RouteSyntaxError::new("the path must start with `/`"));
    };
    if path.len() > MAX_PATH_BYTES {
        return Err(RouteSyntaxError::new(format!(
            "the path is longer than {MAX_PATH_BYTES} bytes"
        )));
    }
    // Said first: `/items/{id}?x=1` would otherwise read as a malformed `{id}` segment.
    if path.contains('?') {
        return Err(RouteSyntaxError::new(
            "the query string is not part of a route: remove `?` and what follows",
        ));
    }
    let mut segments = Vec::new();
    if body.is_empty() {
        return Ok(segments);
    }
    let count = body.split('/').count();
    if count > MAX_SEGMENTS {
        return Err(RouteSyntaxError::new(format!(
            "the path has more than {MAX_SEGMENTS} segments"
        )));
    }
    let mut params = 0usize;
    for (idx, seg) in body.split('/').enumerate() {
        if matches!(segments.last(), Some(PatternSegment::Rest(_))) {
            return Err(RouteSyntaxError::new(
                "`{*name}` must be the last segment of the path \
                 (no trailing `/` after it either)",
            ));
        }
        if seg.is_empty() {
            if idx + 1 == count {
                // A single trailing '/': matches only requests that also end in '/'.
                segments.push(PatternSegment::Literal(Box::from("")));
                continue;
            }
            return Err(RouteSyntaxError::new(
                "empty segment (`//`) in the path: only a single trailing `/` is allowed",
            ));
        }
        if let Some(inner) = seg.strip_prefix('{') {
            let Some(inner) = inner.strip_suffix('}') else {
                return Err(RouteSyntaxError::new(
                    "`{name}` must be a whole segment, opened by `{` and closed by `}`",
                ));
            };
            let (name, rest) = match inner.strip_prefix('*') {
                Some(name) => (name, true),
                None => (inner, false),
            };
            check_param_name(name)?;
            let duplicate = segments.iter().any(
                |s| matches!(s, PatternSegment::Param(n) | PatternSegment::Rest(n) if &**n == name),
            );
            if duplicate {
                return Err(RouteSyntaxError::new(format!(
                    "parameter `{name}` appears twice in the route"
                )));
            }
            params += 1;
            if params > MAX_PARAMS {
                return Err(RouteSyntaxError::new(format!(
                    "a route may have at most {MAX_PARAMS} parameters"
                )));
            }
            segments.push(if rest {
                PatternSegment::Rest(Box::from(name))
            } else {
                PatternSegment::Param(Box::from(name))
            });
        } else {
            check_literal(seg)?;
            segments.push(PatternSegment::Literal(Box::from(seg)));
        }
    }
    Ok(segments)
}

fn check_param_name(name: &str) -> Result<(), RouteSyntaxError> {
    let mut bytes = name.bytes();
    let valid = match bytes.next() {
        Some(first) => {
            (first.is_ascii_alphabetic() || first == b'_')
                && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
        }
        None => false,
    };
    if valid {
        Ok(())
    } else if name.is_empty() {
        Err(RouteSyntaxError::new(
            "parameter name is empty: write `{name}` or `{*name}`",
        ))
    } else {
        Err(RouteSyntaxError::new(format!(
            "parameter name `{}` is not valid: use letters, digits and `_`, \
             not starting with a digit",
            name.escape_debug()
        )))
    }
}

/// Punctuation a literal segment may use: RFC 3986 unreserved marks, sub-delims except `;`
/// (refused in requests) and `*` (looks like a wildcard, which it is not), `:` and `@`.
const LITERAL_PUNCTUATION: &[u8] = b"-._~!$&'()+,=:@";

/// Literal segments must already be in canonical form, since requests are compared after
/// canonicalization: unreserved characters, sub-delims except `;` and `*`, `:` and `@`. No
/// `%`, so there is nothing to decode and a literal can never be spelled two ways.
fn check_literal(seg: &str) -> Result<(), RouteSyntaxError> {
    if seg == "." || seg == ".." {
        return Err(RouteSyntaxError::new(format!(
            "dot segment `{seg}` is not allowed in a route \
             (such requests are refused as ambiguous)"
        )));
    }
    for c in seg.chars() {
        let allowed = u8::try_from(c)
            .is_ok_and(|b| b.is_ascii_alphanumeric() || LITERAL_PUNCTUATION.contains(&b));
        if allowed {
            continue;
        }
        let message = match c {
            '%' => {
                "`%` is not allowed in a route: routes are written decoded (`~`, not `%7E`); \
                 use `{name}` for a segment that needs percent-encoding"
            }
            '?' => "the query string is not part of a route: remove `?` and what follows",
            '#' => "`#` (a fragment) is not allowed in a route",
            ';' => {
                "`;` is not allowed in a route: requests with `;` in the path are refused \
                 as ambiguous"
            }
            '\\' => "`\\` is not allowed in a route",
            '{' | '}' => "`{name}` must be a whole segment, e.g. `/items/{id}`",
            '*' => {
                "`*` is not a wildcard in routes: use `{name}` for one segment or `{*name}` \
                 for the rest"
            }
            c if c.is_whitespace() || c.is_control() => {
                "whitespace and control characters are not allowed in a route"
            }
            c if !c.is_ascii() => {
                "non-ASCII characters are not allowed in a route: use `{name}` for such segments"
            }
            // Printable ASCII outside the URI path grammar (`"`, `<`, `[`, `^`, `|`, ...).
            c => {
                return Err(RouteSyntaxError::new(format!(
                    "`{c}` is not allowed in a route path"
                )))
            }
        };
        return Err(RouteSyntaxError::new(message));
    }
    Ok(())
}

impl fmt::Display for RoutePattern {
    /// Canonical text, e.g. `GET|POST /a/{x}/{*rest}` (methods in written order); parsing it
    /// yields the same pattern.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, m) in self.methods.iter().enumerate() {
            if i > 0 {
                f.write_str("|")?;
            }
            f.write_str(m.as_str())?;
        }
        f.write_str(" /")?;
        for (i, s) in self.segments.iter().enumerate() {
            if i > 0 {
                f.write_str("/")?;
            }
            match s {
                PatternSegment::Literal(l) => f.write_str(l)?,
                PatternSegment::Param(n) => write!(f, "{{{n}}}")?,
                PatternSegment::Rest(n) => write!(f, "{{*{n}}}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route(s: &str) -> RoutePattern {
        match RoutePattern::parse(s) {
            Ok(r) => r,
            Err(e) => panic!("{s:?}: {e}"),
        }
    }

    #[test]
    fn valid_routes_parse_and_print_back() {
        use PatternSegment::{Literal, Param, Rest};
        let lit = |s: &str| Literal(Box::from(s));
        let param = |s: &str| Param(Box::from(s));
        let cases: Vec<(&str, Vec<Method>, Vec<PatternSegment>)> = vec![
            ("GET /", vec![Method::GET], vec![]),
            ("GET /a/", vec![Method::GET], vec![lit("a"), lit("")]),
            (
                "GET|HEAD /x/{*rest}",
                vec![Method::GET, Method::HEAD],
                vec![lit("x"), Rest(Box::from("rest"))],
            ),
            (
                "POST /repos/{owner}/{repo}/issues/{number}/comments",
                vec![Method::POST],
                vec![
                    lit("repos"),
                    param("owner"),
                    param("repo"),
                    lit("issues"),
                    param("number"),
                    lit("comments"),
                ],
            ),
            ("GET /{x}/", vec![Method::GET], vec![param("x"), lit("")]),
            (
                "PUT|GET /{_x1}",
                vec![Method::PUT, Method::GET],
                vec![param("_x1")],
            ),
            (
                "M-SEARCH|PROPFIND /dav",
                vec![
                    Method::from_bytes(b"M-SEARCH").unwrap(),
                    Method::from_bytes(b"PROPFIND").unwrap(),
                ],
                vec![lit("dav")],
            ),
            (
                "GET /v1/a:b@c!$&'()+,=~-._/...",
                vec![Method::GET],
                vec![lit("v1"), lit("a:b@c!$&'()+,=~-._"), lit("...")],
            ),
        ];
        for (text, methods, segments) in cases {
            let r = route(text);
            assert_eq!(r.methods, methods, "{text}");
            assert_eq!(r.segments, segments, "{text}");
            assert_eq!(r.to_string(), text);
        }
    }

    #[test]
    fn param_names_in_path_order() {
        let r = route("GET /repos/{owner}/{repo}/git/{*path}");
        assert_eq!(
            r.param_names().collect::<Vec<_>>(),
            ["owner", "repo", "path"]
        );
        assert_eq!(route("GET /a/b").param_names().count(), 0);
    }

    #[test]
    fn syntax_errors_say_what_is_wrong() {
        let nine_params = format!(
            "GET {}",
            (0..9).map(|i| format!("/{{p{i}}}")).collect::<String>()
        );
        let eight_params = format!(
            "GET {}",
            (0..8).map(|i| format!("/{{p{i}}}")).collect::<String>()
        );
        let too_many_segments = format!("GET {}", "/a".repeat(MAX_SEGMENTS + 1));
        let too_long = format!("GET /{}", "a".repeat(MAX_PATH_BYTES));
        let cases: &[(&str, &str)] = &[
            ("", "empty"),
            ("GET", "exactly one space"),
            ("GET  /a", "exactly one space"),
            ("GET /a ", "exactly one space"),
            ("GET\t/a", "exactly one space"),
            ("GET /a\n", "exactly one space"),
            (" /a", "method is missing"),
            ("get /a", "methods are case-sensitive; write `GET`"),
            ("Get|post /a", "methods are case-sensitive; write `GET`"),
            ("TRACE /a", "method `TRACE` may not appear in a route"),
            ("TRACK /a", "method `TRACK` may not appear in a route"),
            (
                "GET|CONNECT /a",
                "method `CONNECT` may not appear in a route",
            ),
            ("GET|GET /a", "method `GET` is listed twice"),
            ("GET||POST /a", "empty method name"),
            ("|GET /a", "empty method name"),
            ("GET| /a", "empty method name"),
            ("* /a", "`*` is not a method"),
            ("G?T /a", "not a method name"),
            ("1GET /a", "not a method name"),
            ("GET a", "must start with `/`"),
            ("GET //a", "empty segment"),
            ("GET /a//b", "empty segment"),
            ("GET /a//", "empty segment"),
            ("GET /.", "dot segment `.`"),
            ("GET /a/../b", "dot segment `..`"),
            ("GET /a%2Fb", "`%` is not allowed"),
            ("GET /%7E", "`%` is not allowed"),
            ("GET /a?x=1", "query string"),
            // Even when a parameter's brace comes before it: the `?` is the mistake.
            ("POST /items/{id}?x=1", "query string"),
            ("GET /items/{id}?", "query string"),
            ("GET /a#f", "fragment"),
            ("GET /a;b", "`;` is not allowed"),
            ("GET /a\\b", "`\\` is not allowed"),
            ("GET /a{b}", "whole segment"),
            ("GET /{a", "whole segment"),
            ("GET /{a}b", "whole segment"),
            ("GET /a}", "whole segment"),
            ("GET /*", "not a wildcard"),
            ("GET /a/**", "not a wildcard"),
            ("GET /caf\u{e9}", "non-ASCII"),
            ("GET /a\"b", "`\"` is not allowed"),
            ("GET /{}", "parameter name is empty"),
            ("GET /{*}", "parameter name is empty"),
            ("GET /{1a}", "parameter name `1a` is not valid"),
            ("GET /{a-b}", "is not valid"),
            ("GET /{{a}}", "is not valid"),
            ("GET /{a}/{a}", "parameter `a` appears twice"),
            ("GET /{a}/{*a}", "parameter `a` appears twice"),
            ("GET /{*a}/b", "must be the last segment"),
            ("GET /{*a}/", "must be the last segment"),
            (&nine_params, "at most 8 parameters"),
            (&too_many_segments, "more than 128 segments"),
            (&too_long, "longer than 8192 bytes"),
        ];
        for (text, want) in cases {
            match RoutePattern::parse(text) {
                Ok(r) => panic!("{text:?} parsed as {r}"),
                Err(e) => {
                    assert!(e.to_string().contains(want), "{text:?}: {e}");
                    assert_eq!(e.message(), e.to_string());
                    assert!(!e.message().contains('\n'), "{text:?}: {e}");
                }
            }
        }
        assert_eq!(route(&eight_params).param_names().count(), MAX_PARAMS);
    }

    #[test]
    fn overlap_cases() {
        let cases: &[(&str, &str, bool)] = &[
            ("GET /a", "GET /a", true),
            ("GET /a", "POST /a", false),
            ("GET|POST /a", "PUT|POST /a", true),
            ("GET /a", "HEAD /a", false),
            ("GET /a", "GET /b", false),
            ("GET /{x}", "GET /a", true),
            ("GET /{x}", "GET /", false),
            ("GET /", "GET /", true),
            ("GET /{*r}", "GET /", false),
            ("GET /{*r}", "GET /a/b/c", true),
            ("GET /{*r}", "GET /a/b/", true),
            ("GET /a/{*r}", "GET /a", false),
            // `{*r}` needs a non-empty first segment, so `/a/` is not under `/a/{*r}`.
            ("GET /a/{*r}", "GET /a/", false),
            ("GET /a/{*r}", "GET /a/b/", true),
            ("GET /a/{*r}", "GET /{x}/{y}/c", true),
            ("GET /{x}/", "GET /a", false),
            ("GET /{x}/", "GET /a/", true),
            ("GET /{x}", "GET /a/", false),
            ("GET /a/{x}", "GET /{y}/b", true),
            ("GET /a/{x}/c", "GET /{y}/b/d", false),
            ("GET /{*a}", "GET /{*b}", true),
            ("GET /x/{*a}", "GET /y/{*b}", false),
            ("GET /x/{*a}", "GET /{y}/{*b}", true),
            (
                "GET /repos/{o}/{r}/issues",
                "GET /repos/{o}/{r}/pulls",
                false,
            ),
            ("GET /repos/{o}/{r}/issues", "GET /repos/{*rest}", true),
        ];
        for (a, b, want) in cases {
            let (a, b) = (route(a), route(b));
            assert_eq!(a.overlaps(&b), *want, "{a} vs {b}");
            assert_eq!(b.overlaps(&a), *want, "{b} vs {a} (symmetry)");
        }
    }

    /// Naive path matcher used as the reference in property tests (also by router.rs).
    pub(crate) fn naive_match(p: &RoutePattern, segs: &[&str]) -> Option<Vec<(usize, usize)>> {
        let mut caps = Vec::new();
        for (i, ps) in p.segments.iter().enumerate() {
            match ps {
                PatternSegment::Literal(l) => {
                    if segs.get(i) != Some(&&**l) {
                        return None;
                    }
                }
                PatternSegment::Param(_) => match segs.get(i) {
                    Some(s) if !s.is_empty() => caps.push((i, i + 1)),
                    _ => return None,
                },
                PatternSegment::Rest(_) => {
                    return match segs.get(i) {
                        Some(s) if !s.is_empty() => {
                            caps.push((i, segs.len()));
                            Some(caps)
                        }
                        _ => None,
                    };
                }
            }
        }
        (segs.len() == p.segments.len()).then_some(caps)
    }

    /// Route text over a tiny alphabet so that overlaps and matches are frequent.
    pub(crate) fn small_route() -> impl Strategy<Value = String> {
        let methods = prop::sample::select(vec!["GET", "POST", "GET|POST", "POST|GET"]);
        let seg = prop::sample::select(vec!["a", "b", "{}"]);
        let end = prop::sample::select(vec!["", "/", "/{*r}"]);
        (methods, prop::collection::vec(seg, 0..4), end).prop_map(|(m, segs, end)| {
            let mut path = String::new();
            for (i, s) in segs.iter().enumerate() {
                path.push('/');
                if *s == "{}" {
                    path.push_str(&format!("{{p{i}}}"));
                } else {
                    path.push_str(s);
                }
            }
            if path.is_empty() && end != "/{*r}" {
                return format!("{m} /");
            }
            format!("{m} {path}{end}")
        })
    }

    /// Route-shaped text built from pieces that hit every syntax check.
    fn tricky_route() -> impl Strategy<Value = String> {
        let method = prop::sample::select(vec![
            "GET", "get", "POST", "TRACE", "M-SEARCH", "", "*", "G T",
        ]);
        let sep = prop::sample::select(vec![" ", " ", " ", "  ", "\t", ""]);
        let piece = prop::sample::select(vec![
            "/", "/", "/", "a", "b", "{x}", "{y}", "{*r}", "{", "}", "*", ".", "..", "%", "%41",
            "?", "#", ";", "\\", ":", "@", "\u{e9}", "{1}", "{}", "|",
        ]);
        (
            prop::collection::vec(method, 1..3),
            sep,
            prop::collection::vec(piece, 0..8),
        )
            .prop_map(|(m, sep, p)| format!("{}{sep}{}", m.join("|"), p.concat()))
    }

    /// Every canonical path of up to `max` segments over {a, b, z}, optionally with a trailing `/`.
    fn witness_paths(max: usize) -> Vec<Vec<&'static str>> {
        let mut all: Vec<Vec<&'static str>> = vec![vec![]];
        let mut frontier: Vec<Vec<&'static str>> = vec![vec![]];
        for _ in 0..max {
            let mut next = Vec::new();
            for p in &frontier {
                for s in ["a", "b", "z"] {
                    let mut q = p.clone();
                    q.push(s);
                    next.push(q);
                }
            }
            for p in &next {
                let mut t = p.clone();
                t.push("");
                all.push(t);
            }
            all.extend(next.iter().cloned());
            frontier = next;
        }
        all
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn parse_never_panics_and_round_trips(text in any::<String>()) {
            if let Ok(r) = RoutePattern::parse(&text) {
                prop_assert_eq!(RoutePattern::parse(&r.to_string()), Ok(r));
            }
        }

        #[test]
        fn tricky_text_never_panics_and_round_trips(text in tricky_route()) {
            if let Ok(r) = RoutePattern::parse(&text) {
                prop_assert_eq!(r.to_string(), text.clone());
                prop_assert_eq!(RoutePattern::parse(&r.to_string()), Ok(r));
            }
        }

        #[test]
        fn generated_routes_round_trip(text in small_route()) {
            let r = route(&text);
            prop_assert_eq!(r.to_string(), text);
        }

        #[test]
        fn overlaps_agrees_with_brute_force(a in small_route(), b in small_route()) {
            let (a, b) = (route(&a), route(&b));
            let methods_meet = a.methods.iter().any(|m| b.methods.contains(m));
            let witness = witness_paths(5).iter().any(|p| {
                naive_match(&a, p).is_some() && naive_match(&b, p).is_some()
            });
            prop_assert_eq!(a.overlaps(&b), methods_meet && witness, "{} vs {}", a, b);
        }
    }
}
