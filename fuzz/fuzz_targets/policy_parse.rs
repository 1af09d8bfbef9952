//! Arbitrary UTF-8 as a policy file → `policy::parse` must not panic, and every error must
//! Display as `file:line:column: ...` with 1-based numbers that match its fields, sorted by
//! position. A valid policy must compile, and parsing the same text again gives the same result.

#![no_main]

use std::path::Path;
use std::sync::Once;

use keyward::policy::{self, CompiledPolicy};
use libfuzzer_sys::fuzz_target;

const FILE: &str = "fuzz.yaml";

static HOOK: Once = Once::new();

/// libFuzzer's panic hook aborts before unwinding, which would also turn a panic inside
/// marked-yaml (that keyward deliberately catches with `catch_unwind`, because the loader has
/// `unreachable!`s on event orders) into a crash. Let those unwind into keyward's handler, as
/// they do in production; every other panic still aborts and is reported.
fn tolerate_caught_yaml_panics() {
    HOOK.call_once(|| {
        let aborting = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let in_yaml_loader = info.location().is_some_and(|l| {
                let file = l.file();
                file.contains("marked-yaml") || file.contains("yaml-rust2")
            });
            if in_yaml_loader {
                eprintln!("(caught by keyward) marked-yaml panicked: {info}");
            } else {
                aborting(info);
            }
        }));
    });
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    tolerate_caught_yaml_panics();
    let base = Path::new("/nonexistent/keyward-fuzz");
    let result = policy::parse(FILE, text, base);
    match &result {
        Ok(p) => {
            assert_eq!(p.version.len(), 16);
            let compiled = CompiledPolicy::compile(p.clone());
            assert_eq!(
                compiled.route_count(),
                p.capabilities.iter().map(|c| c.routes.len()).sum::<usize>()
            );
        }
        Err(errs) => {
            assert!(!errs.0.is_empty(), "an error result with no errors");
            let mut last = (1, 1);
            for e in &errs.0 {
                assert!(e.line >= 1 && e.column >= 1, "position 0 in {e:?}");
                assert_eq!(e.file, FILE);
                let shown = e.to_string();
                let prefix = format!("{FILE}:{}:{}: ", e.line, e.column);
                assert!(shown.starts_with(&prefix), "{shown:?} lacks {prefix:?}");
                assert!(shown.len() > prefix.len(), "{shown:?} has no message");
                assert!(!e.message.is_empty(), "empty message in {e:?}");
                assert!((e.line, e.column) >= last, "errors out of order: {errs:?}");
                last = (e.line, e.column);
            }
        }
    }
    // Pure: the same text gives the same answer.
    let again = policy::parse(FILE, text, base);
    match (&result, &again) {
        (Ok(a), Ok(b)) => assert_eq!(a, b),
        (Err(a), Err(b)) => assert_eq!(a, b),
        _ => panic!("parse is not deterministic"),
    }
});
