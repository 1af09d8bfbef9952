//! Arbitrary bytes as a request target → `canonicalize` must not panic, must accept exactly
//! the targets an independent scan finds unambiguous (within the length limits), and what it
//! accepts must keep the `CanonPath` invariants: no `.`/`..` segment, no empty segment but a
//! trailing one, `raw_path()` is the received path (a prefix of the input), and the canonical
//! text is a fixed point.

#![no_main]

mod common;

use keyward::matcher::canon::{canonicalize, MAX_PATH_BYTES, MAX_SEGMENTS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Request targets reach the matcher as &str (hyper's Uri is ASCII); feed invalid UTF-8 in
    // its lossy form so those bytes still exercise the non-ASCII paths.
    let owned;
    let target = match std::str::from_utf8(data) {
        Ok(s) => s,
        Err(_) => {
            owned = String::from_utf8_lossy(data).into_owned();
            owned.as_str()
        }
    };
    check(target);
});

fn check(target: &str) {
    let result = canonicalize(target);
    let path_part = target.split('?').next().unwrap_or("");
    let within_limits = path_part.len() <= MAX_PATH_BYTES
        && path_part.bytes().filter(|&b| b == b'/').count() <= MAX_SEGMENTS;
    let scan = common::ambiguous_form(target);

    let path = match result {
        Ok(path) => path,
        Err(reason) => {
            // Refused: the independent scan must agree there is something to refuse.
            assert!(
                scan.is_some() || !within_limits,
                "{target:?} refused as {reason:?} but the reference scan finds nothing ambiguous"
            );
            // Display never echoes the target and is one line.
            let text = reason.to_string();
            assert!(!text.is_empty() && !text.contains('\n'));
            return;
        }
    };
    assert_eq!(
        scan, None,
        "{target:?} accepted but the reference scan says {scan:?}"
    );

    let raw = path.raw_path();
    assert!(
        target.starts_with(raw),
        "raw_path {raw:?} is not a prefix of {target:?}"
    );
    assert_eq!(
        raw, path_part,
        "raw_path is not the path part of {target:?}"
    );

    let segs = common::segments(&path);
    assert_eq!(segs.len(), path.len());
    assert!(path.len() <= MAX_SEGMENTS);
    assert_eq!(path.is_empty(), segs.is_empty());
    for (i, s) in segs.iter().enumerate() {
        assert!(*s != "." && *s != "..", "dot segment {i} in {target:?}");
        assert!(
            !s.is_empty() || i + 1 == segs.len(),
            "empty segment {i} in {target:?}"
        );
        assert!(!s.contains('/'), "segment {i} holds a `/` in {target:?}");
        assert_eq!(path.segment(i), *s);
        assert!(s.is_ascii());
    }
    // A trailing `/` (and only that) gives a final empty segment.
    assert_eq!(
        segs.last() == Some(&""),
        raw.len() > 1 && raw.ends_with('/'),
        "{target:?}"
    );

    // Spans and tails are the segments joined by `/`.
    let joined = segs.join("/");
    assert_eq!(path.tail(0), joined);
    assert_eq!(path.join_from(0), joined);
    for i in 0..=segs.len() {
        assert_eq!(path.tail(i), segs[i.min(segs.len())..].join("/"));
    }

    // The canonical text is a fixed point: canonicalizing it again gives the same segments.
    let canonical = format!("/{joined}");
    match canonicalize(&canonical) {
        Ok(again) => assert!(
            again.segments().eq(segs.iter().copied()),
            "{target:?}: canonical text {canonical:?} canonicalizes differently"
        ),
        Err(e) => panic!("{target:?}: canonical text {canonical:?} refused as {e:?}"),
    }
}
