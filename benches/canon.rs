//! Path canonicalization (`matcher::canon::canonicalize`) of typical request targets, and of
//! two that are refused as ambiguous. Inputs and expected results: `support/inputs.rs`.
//!
//!     cargo bench --bench canon -- --warm-up-time 1 --measurement-time 3

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/gen_policy.rs"]
mod gen_policy;
#[path = "support/inputs.rs"]
mod inputs;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use keyward::matcher::canon::canonicalize;

fn bench_canon(c: &mut Criterion) {
    let mut group = c.benchmark_group("canon");
    for (name, target, expect) in inputs::CANON_CASES {
        assert_eq!(inputs::canon_result(target), expect, "{name}");
        group.bench_function(name, |b| b.iter(|| canonicalize(black_box(target))));
    }
    group.finish();
}

criterion_group!(benches, bench_canon);
criterion_main!(benches);
