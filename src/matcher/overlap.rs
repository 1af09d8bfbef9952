//! Finding the routes that can overlap a given one without comparing every pair: `keyward
//! check` compares the routes of two services that share a host (SPEC §3), and pairwise that
//! took seconds for policies with tens of thousands of routes.
//!
//! The index may name a route that does not overlap (the caller confirms each with
//! [`RoutePattern::overlaps`], which also compares methods), never miss one that does: a tree
//! of path segments, walked with the segment rules of `route::paths_overlap`.

use std::collections::HashMap;

use super::route::{PatternSegment, RoutePattern};

/// Routes (each with a caller's tag) indexed by their path segments.
pub struct OverlapIndex<T> {
    root: Node<T>,
}

struct Node<T> {
    literals: HashMap<Box<str>, Node<T>>,
    param: Option<Box<Node<T>>>,
    /// Routes whose `{*rest}` starts here.
    rest: Vec<T>,
    /// Routes that end here.
    ends: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literals: HashMap::new(),
            param: None,
            rest: Vec::new(),
            ends: Vec::new(),
        }
    }
}

impl<T: Copy> OverlapIndex<T> {
    pub fn new() -> Self {
        OverlapIndex {
            root: Node::default(),
        }
    }

    pub fn insert(&mut self, route: &RoutePattern, tag: T) {
        let mut node = &mut self.root;
        for seg in &route.segments {
            node = match seg {
                PatternSegment::Literal(l) => node.literals.entry(l.clone()).or_default(),
                PatternSegment::Param(_) => node.param.get_or_insert_with(Default::default),
                PatternSegment::Rest(_) => {
                    node.rest.push(tag);
                    return;
                }
            };
        }
        node.ends.push(tag);
    }

    /// Every tag whose route's path can match a request path `route`'s can (and maybe some
    /// more; methods are not looked at).
    pub fn candidates(&self, route: &RoutePattern, out: &mut Vec<T>) {
        walk(&self.root, &route.segments, out);
    }
}

impl<T: Copy> Default for OverlapIndex<T> {
    fn default() -> Self {
        Self::new()
    }
}

fn walk<T: Copy>(node: &Node<T>, segs: &[PatternSegment], out: &mut Vec<T>) {
    let Some((first, rest)) = segs.split_first() else {
        // The path ends here: only routes that end here too (a `{*rest}` needs a segment).
        out.extend_from_slice(&node.ends);
        return;
    };
    match first {
        // One or more segments, the first non-empty: every route that goes on from here
        // with a non-empty segment.
        PatternSegment::Rest(_) => {
            out.extend_from_slice(&node.rest);
            for (literal, child) in &node.literals {
                if !literal.is_empty() {
                    everything_below(child, out);
                }
            }
            if let Some(child) = &node.param {
                everything_below(child, out);
            }
        }
        // The empty literal (a trailing `/`) matches only itself.
        PatternSegment::Literal(l) if l.is_empty() => {
            if let Some(child) = node.literals.get(l) {
                walk(child, rest, out);
            }
        }
        // A non-empty segment: the same literal, a `{param}`, or a `{*rest}` (which takes
        // whatever follows).
        PatternSegment::Literal(l) => {
            out.extend_from_slice(&node.rest);
            if let Some(child) = node.literals.get(l) {
                walk(child, rest, out);
            }
            if let Some(child) = &node.param {
                walk(child, rest, out);
            }
        }
        PatternSegment::Param(_) => {
            out.extend_from_slice(&node.rest);
            for (literal, child) in &node.literals {
                if !literal.is_empty() {
                    walk(child, rest, out);
                }
            }
            if let Some(child) = &node.param {
                walk(child, rest, out);
            }
        }
    }
}

fn everything_below<T: Copy>(node: &Node<T>, out: &mut Vec<T>) {
    out.extend_from_slice(&node.ends);
    out.extend_from_slice(&node.rest);
    for child in node.literals.values() {
        everything_below(child, out);
    }
    if let Some(child) = &node.param {
        everything_below(child, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matcher::route::tests::small_route;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        // The index finds every route the pairwise test says overlaps (it may name more).
        #[test]
        fn the_index_misses_no_overlap(
            indexed in prop::collection::vec(small_route(), 0..12),
            asked in small_route(),
        ) {
            let indexed: Vec<RoutePattern> =
                indexed.iter().filter_map(|r| RoutePattern::parse(r).ok()).collect();
            let Ok(asked) = RoutePattern::parse(&asked) else {
                return Ok(());
            };
            let mut index = OverlapIndex::new();
            for (i, r) in indexed.iter().enumerate() {
                index.insert(r, i);
            }
            let mut found = Vec::new();
            index.candidates(&asked, &mut found);
            for (i, r) in indexed.iter().enumerate() {
                if r.overlaps(&asked) {
                    prop_assert!(found.contains(&i), "{} overlaps {} but was not found", r, asked);
                }
            }
        }
    }

    #[test]
    fn a_parameter_against_many_literals_finds_only_what_can_match() {
        let mut index = OverlapIndex::new();
        let routes: Vec<RoutePattern> = (0..1000)
            .map(|i| RoutePattern::parse(&format!("GET /q/m{i}")).unwrap())
            .collect();
        for (i, r) in routes.iter().enumerate() {
            index.insert(r, i);
        }
        let mut found = Vec::new();
        index.candidates(&RoutePattern::parse("GET /{a}/l7").unwrap(), &mut found);
        assert!(found.is_empty(), "{found:?}");
        index.candidates(&RoutePattern::parse("GET /{a}/m7").unwrap(), &mut found);
        assert_eq!(found, [7]);
        found.clear();
        index.candidates(&RoutePattern::parse("GET /q/{*rest}").unwrap(), &mut found);
        assert_eq!(found.len(), 1000);
    }
}
