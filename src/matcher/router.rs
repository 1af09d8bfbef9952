//! The route trie: finds EVERY route whose path matches a canonical request path, with the
//! segment ranges of its parameters.
//!
//! Must never: decide by method (the caller needs "path matched, method did not" for
//! `method_not_allowed`), let a literal route hide a parameter route, look at raw
//! (non-canonical) bytes, or allocate per segment when matching.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use super::canon::CanonPath;
use super::route::{PatternSegment, RoutePattern, MAX_PARAMS};

/// Segment ranges of each parameter of a matched route, in pattern order: `{name}` at path
/// segment `i` is `(i, i + 1)`, `{*name}` from segment `i` is `(i, path.len())`. Stored inline
/// ([`MAX_PARAMS`] entries, u8 indices: paths have at most 128 segments) so a match never
/// allocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Captures {
    len: u8,
    ranges: [(u8, u8); MAX_PARAMS],
}

impl Captures {
    /// Segment range `(start, end)` of capture `k`.
    pub fn get(&self, k: usize) -> Option<(usize, usize)> {
        if k < self.len() {
            self.ranges
                .get(k)
                .map(|&(s, e)| (usize::from(s), usize::from(e)))
        } else {
            None
        }
    }

    /// Number of captures (the route's parameter count).
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// True for a route without parameters.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The canonical text of capture `k` in `path` (the path that was matched): one segment
    /// for `{name}`, segments joined by `/` for `{*name}`. Borrowed, no allocation.
    pub fn value<'p>(&self, k: usize, path: &'p CanonPath) -> Option<&'p str> {
        self.get(k).map(|(s, e)| path.span(s, e))
    }

    /// A copy with one more capture; None when full or an index does not fit (neither can
    /// happen for parsed routes and canonical paths, and not matching is the safe answer).
    fn with(mut self, start: usize, end: usize) -> Option<Captures> {
        let slot = self.ranges.get_mut(usize::from(self.len))?;
        *slot = (u8::try_from(start).ok()?, u8::try_from(end).ok()?);
        self.len += 1;
        Some(self)
    }
}

/// One route whose path matched. `captures` line up with the route's
/// [`RoutePattern::param_names`].
#[derive(Debug)]
pub struct RouteMatch<'r, T> {
    pub value: &'r T,
    pub captures: Captures,
    /// Insertion number, to report matches in insertion order.
    order: usize,
}

/// All routes whose PATH matches a canonical path (methods are not checked here: the caller
/// needs "path matched, method did not" for `method_not_allowed`). A segment trie: static
/// children by exact segment, one parameter child, `{*rest}` entries, terminal entries.
#[derive(Debug)]
pub struct Router<T> {
    root: Node<T>,
    len: usize,
}

#[derive(Debug)]
struct Node<T> {
    /// foldhash, not SipHash: the keys are the policy's own literals (no attacker picks
    /// them), and a segment lookup per path segment is most of a decision's cost.
    statics: HashMap<Box<str>, Node<T>, RandomState>,
    param: Option<Box<Node<T>>>,
    /// Routes ending in `{*rest}` at this depth, with their insertion number.
    rest: Vec<(usize, T)>,
    /// Routes ending exactly here, with their insertion number.
    terminal: Vec<(usize, T)>,
}

impl<T> Node<T> {
    fn new() -> Self {
        Node {
            statics: HashMap::default(),
            param: None,
            rest: Vec::new(),
            terminal: Vec::new(),
        }
    }

    /// Depth-first walk over every branch that can match `path[i..]`. Each trie node is
    /// reached by at most one walk (its depth fixes the segment it sees), so the cost is
    /// bounded by the trie size however the routes are written.
    fn walk<'r, O: Extend<RouteMatch<'r, T>>>(
        &'r self,
        path: &CanonPath,
        i: usize,
        caps: Captures,
        out: &mut O,
    ) {
        if i >= path.len() {
            out.extend(self.terminal.iter().map(|(order, value)| RouteMatch {
                value,
                captures: caps,
                order: *order,
            }));
            return;
        }
        let seg = path.segment(i);
        // Only a trailing segment is ever empty; neither `{name}` nor `{*name}` may start on it.
        let non_empty = !seg.is_empty();
        if non_empty && !self.rest.is_empty() {
            if let Some(captures) = caps.with(i, path.len()) {
                out.extend(self.rest.iter().map(|(order, value)| RouteMatch {
                    value,
                    captures,
                    order: *order,
                }));
            }
        }
        // SECURITY: both the static and the parameter branch are explored, so a literal route
        // never hides a parameter route (of another capability) that also matches.
        if let Some(child) = self.statics.get(seg) {
            child.walk(path, i + 1, caps, out);
        }
        if non_empty {
            if let (Some(child), Some(caps)) = (&self.param, caps.with(i, i + 1)) {
                child.walk(path, i + 1, caps, out);
            }
        }
    }
}

impl<T> Router<T> {
    /// An empty router.
    pub fn new() -> Self {
        Router {
            root: Node::new(),
            len: 0,
        }
    }

    /// Adds `pattern`'s path (its methods are the caller's business) with `value`.
    pub fn insert(&mut self, pattern: &RoutePattern, value: T) {
        let order = self.len;
        self.len += 1;
        let mut node = &mut self.root;
        for seg in &pattern.segments {
            node = match seg {
                PatternSegment::Literal(l) => {
                    node.statics.entry(l.clone()).or_insert_with(Node::new)
                }
                PatternSegment::Param(_) => node.param.get_or_insert_with(|| Box::new(Node::new())),
                PatternSegment::Rest(_) => {
                    // parse() only allows `{*name}` last; anything after it is unreachable.
                    node.rest.push((order, value));
                    return;
                }
            };
        }
        node.terminal.push((order, value));
    }

    /// Appends EVERY entry whose path matches `path` to `out`, in insertion order. Allocates
    /// nothing beyond `out`'s own growth: reuse a `Vec` across requests, or pass a buffer with
    /// inline room (`decide` uses a `SmallVec`, so a request with a few matches allocates
    /// nothing).
    pub fn find<'r, O>(&'r self, path: &CanonPath, out: &mut O)
    where
        O: Extend<RouteMatch<'r, T>> + AsMut<[RouteMatch<'r, T>]>,
    {
        let first = out.as_mut().len();
        self.root.walk(path, 0, Captures::default(), out);
        if let Some(found) = out.as_mut().get_mut(first..) {
            // Insertion numbers are unique, so the unstable (allocation-free) sort is exact.
            found.sort_unstable_by_key(|m| m.order);
        }
    }

    /// Number of inserted routes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing was inserted.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matcher::canon::canonicalize;
    use crate::matcher::route::tests::{naive_match, small_route};
    use proptest::prelude::*;

    fn route(s: &str) -> RoutePattern {
        RoutePattern::parse(s).unwrap()
    }

    fn router(routes: &[&str]) -> Router<usize> {
        let mut r = Router::new();
        for (i, text) in routes.iter().enumerate() {
            r.insert(&route(text), i);
        }
        r
    }

    /// (value, captures as ranges) of every match, in the order `find` reports them.
    fn found(r: &Router<usize>, target: &str) -> Vec<(usize, Vec<(usize, usize)>)> {
        let path = canonicalize(target).unwrap();
        let mut out = Vec::new();
        r.find(&path, &mut out);
        out.iter()
            .map(|m| {
                let caps = (0..m.captures.len()).map(|k| m.captures.get(k).unwrap());
                (*m.value, caps.collect())
            })
            .collect()
    }

    /// A matched route's value and the segment ranges of its captures.
    type Expected = (usize, &'static [(usize, usize)]);

    const ROUTES: &[&str] = &[
        "GET /repos/{owner}/{repo}/issues",   // 0
        "GET /repos/rust-lang/{repo}/issues", // 1
        "GET /repos/{*rest}",                 // 2
        "GET /",                              // 3
        "GET /repos/{owner}/",                // 4
        "POST /repos/{owner}/{repo}/issues",  // 5: same path as 0, other method
        "GET /repos/rust-lang/rust/issues",   // 6: literal inserted after params
    ];

    #[test]
    fn finds_every_matching_route_in_insertion_order() {
        let r = router(ROUTES);
        assert_eq!(r.len(), ROUTES.len());
        assert!(!r.is_empty());
        let cases: &[(&str, &[Expected])] = &[
            (
                "/repos/rust-lang/rust/issues?state=open",
                &[
                    (0, &[(1, 2), (2, 3)]),
                    (1, &[(2, 3)]),
                    (2, &[(1, 4)]),
                    (5, &[(1, 2), (2, 3)]),
                    (6, &[]),
                ],
            ),
            (
                "/repos/x/y/issues",
                &[
                    (0, &[(1, 2), (2, 3)]),
                    (2, &[(1, 4)]),
                    (5, &[(1, 2), (2, 3)]),
                ],
            ),
            ("/", &[(3, &[])]),
            ("/repos", &[]),
            ("/repos/", &[]),
            ("/repos/x", &[(2, &[(1, 2)])]),
            ("/repos/x/", &[(2, &[(1, 3)]), (4, &[(1, 2)])]),
            ("/repos/x/y/issues/", &[(2, &[(1, 5)])]),
            ("/other", &[]),
            ("/Repos/x", &[]),
        ];
        for (target, want) in cases {
            let want: Vec<(usize, Vec<(usize, usize)>)> =
                want.iter().map(|(v, c)| (*v, c.to_vec())).collect();
            assert_eq!(found(&r, target), want, "target {target}");
        }
    }

    #[test]
    fn capture_values_borrow_canonical_text() {
        let r = router(&["GET /files/{user}/{*path}"]);
        let path = canonicalize("/files/%61l%69ce/docs/a%3ab/?x=1").unwrap();
        let mut out = Vec::new();
        r.find(&path, &mut out);
        assert_eq!(out.len(), 1);
        let caps = out[0].captures;
        assert!(!caps.is_empty());
        assert_eq!(caps.value(0, &path), Some("alice"));
        assert_eq!(caps.value(1, &path), Some("docs/a%3Ab/"));
        assert_eq!(caps.value(2, &path), None);
        assert_eq!(caps.get(2), None);
    }

    #[test]
    fn find_appends_after_existing_entries() {
        let r = router(&["GET /{x}", "GET /a"]);
        let mut out = Vec::new();
        r.find(&canonicalize("/a").unwrap(), &mut out);
        r.find(&canonicalize("/b").unwrap(), &mut out);
        let values: Vec<usize> = out.iter().map(|m| *m.value).collect();
        assert_eq!(values, [0, 1, 0]);
    }

    #[test]
    fn empty_router_finds_nothing() {
        let r: Router<()> = Router::default();
        assert!(r.is_empty());
        let mut out = Vec::new();
        r.find(&canonicalize("/a").unwrap(), &mut out);
        assert!(out.is_empty());
    }

    fn small_path() -> impl Strategy<Value = String> {
        let seg = prop::sample::select(vec!["a", "b", "c", "%61", "%62", "x%2d"]);
        (
            prop::collection::vec(seg, 0..6),
            any::<bool>(),
            "[a-z=&%2F]{0,4}",
        )
            .prop_map(|(segs, trailing, query)| {
                let mut t = String::new();
                for s in &segs {
                    t.push('/');
                    t.push_str(s);
                }
                if trailing || t.is_empty() {
                    t.push('/');
                }
                format!("{t}?{query}")
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn find_agrees_with_naive_matcher(
            routes in prop::collection::vec(small_route(), 1..8),
            target in small_path(),
        ) {
            let patterns: Vec<RoutePattern> = routes.iter().map(|t| route(t)).collect();
            let mut r = Router::new();
            for (i, p) in patterns.iter().enumerate() {
                r.insert(p, i);
            }
            let path = canonicalize(&target).unwrap();
            let segs: Vec<&str> = path.segments().collect();
            let want: Vec<(usize, Vec<(usize, usize)>)> = patterns
                .iter()
                .enumerate()
                .filter_map(|(i, p)| naive_match(p, &segs).map(|c| (i, c)))
                .collect();
            let mut out = Vec::new();
            r.find(&path, &mut out);
            let got: Vec<(usize, Vec<(usize, usize)>)> = out
                .iter()
                .map(|m| {
                    let caps = (0..m.captures.len()).filter_map(|k| m.captures.get(k));
                    (*m.value, caps.collect())
                })
                .collect();
            prop_assert_eq!(got, want, "target {}", target);
            for m in &out {
                let names = patterns[*m.value].param_names().count();
                prop_assert_eq!(m.captures.len(), names);
            }
        }
    }
}
