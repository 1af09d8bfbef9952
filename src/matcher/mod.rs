//! Request-path matching: turning a received request target into canonical segments
//! (`canon`), route syntax and overlaps (`route`, indexed in `overlap`), and finding every
//! route a canonical path matches (`router`).
//!
//! Owns: the ambiguity rules of SPEC §4.4 for the path, route syntax (SPEC §3) and the
//! route trie. Must never: do I/O, be async, look at headers or hosts, or modify the bytes
//! that are forwarded — the canonical form is for matching only.

pub mod canon;
pub mod overlap;
pub mod route;
pub mod router;

pub use canon::{canonicalize, Ambiguity, CanonPath};
pub use route::{Captures, PatternSegment, RouteMatch, RoutePattern, RouteSyntaxError, Router};
