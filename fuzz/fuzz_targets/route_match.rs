//! Routes and request targets from fuzz input: every line that starts with `/` is a request
//! target, every other line is tried as a route (`METHODS /path`). The routes that parse go into
//! a `Router`; for each target that canonicalizes, `find` must report exactly the routes (in
//! insertion order, with the same capture ranges) that a naive reference matcher finds.
//! Parsed routes must also print back to text that parses to the same route, and two routes that
//! match one target with a method in common must be reported as overlapping.

#![no_main]

mod common;

use keyward::matcher::canon::canonicalize;
use keyward::matcher::route::{RoutePattern, Router};
use libfuzzer_sys::fuzz_target;

/// Enough routes for branching tries; more only slows each run down.
const MAX_ROUTES: usize = 16;
const MAX_TARGETS: usize = 16;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut patterns: Vec<RoutePattern> = Vec::new();
    let mut targets: Vec<&str> = Vec::new();
    for line in text.split('\n') {
        if line.starts_with('/') {
            if targets.len() < MAX_TARGETS {
                targets.push(line);
            }
        } else if patterns.len() < MAX_ROUTES {
            match RoutePattern::parse(line) {
                Ok(p) => {
                    let printed = p.to_string();
                    assert_eq!(
                        RoutePattern::parse(&printed).as_ref(),
                        Ok(&p),
                        "{line:?} prints as {printed:?}"
                    );
                    patterns.push(p);
                }
                Err(e) => assert!(!e.message().is_empty() && !e.message().contains('\n')),
            }
        }
    }

    let mut router = Router::new();
    for (i, p) in patterns.iter().enumerate() {
        router.insert(p, i);
    }
    assert_eq!(router.len(), patterns.len());

    let mut out = Vec::new();
    for target in targets {
        let Ok(path) = canonicalize(target) else {
            continue;
        };
        let segs = common::segments(&path);
        out.clear();
        router.find(&path, &mut out);
        let got: Vec<(usize, Vec<(usize, usize)>)> = out
            .iter()
            .map(|m| {
                let caps = (0..m.captures.len()).map(|k| m.captures.get(k).unwrap_or((0, 0)));
                (*m.value, caps.collect())
            })
            .collect();
        let want: Vec<(usize, Vec<(usize, usize)>)> = patterns
            .iter()
            .enumerate()
            .filter_map(|(i, p)| common::reference_match(p, &segs).map(|c| (i, c)))
            .collect();
        assert_eq!(got, want, "target {target:?} against routes {patterns:?}");

        // Capture values are the canonical text of their segments.
        for m in &out {
            let names: Vec<&str> = patterns[*m.value].param_names().collect();
            assert_eq!(m.captures.len(), names.len());
            for k in 0..m.captures.len() {
                let (s, e) = m.captures.get(k).unwrap_or((0, 0));
                assert_eq!(
                    m.captures.value(k, &path),
                    Some(segs[s..e].join("/").as_str())
                );
                assert!(!segs[s].is_empty(), "a capture starts on an empty segment");
            }
        }

        // SECURITY: `keyward check` refuses two services whose routes overlap; a path matched by
        // two routes with a method in common is a witness that `overlaps` must not miss.
        for a in &out {
            for b in &out {
                let (pa, pb) = (&patterns[*a.value], &patterns[*b.value]);
                if pa.methods.iter().any(|m| pb.methods.contains(m)) {
                    assert!(pa.overlaps(pb), "{pa} and {pb} both match {target:?}");
                }
            }
        }
    }
});
