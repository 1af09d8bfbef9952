//! `TaskStore::authenticate` with 10 and with 100,000 live tasks: a `Basic` header (the form
//! `HTTPS_PROXY=http://TASK:TOKEN@...` sends), a `Bearer` header, and a Basic header naming an
//! unknown task (refused). Lookup should be flat in the number of tasks.
//!
//!     cargo bench --bench tokens -- --warm-up-time 1 --measurement-time 3

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/gen_policy.rs"]
mod gen_policy;
#[path = "support/inputs.rs"]
mod inputs;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use gen_policy::{generate, Spec};
use keyward::reason::Reason;

fn bench_tokens(c: &mut Criterion) {
    let generated = generate(&Spec::large());
    let policy = inputs::compile(&generated);
    let fixtures: Vec<(usize, inputs::TokenFixture)> = [10, 100_000]
        .into_iter()
        .map(|n| (n, inputs::token_fixture(&policy, &generated, n)))
        .collect();
    let mut group = c.benchmark_group("tokens");
    for (n, f) in &fixtures {
        assert_eq!(f.store.len(), *n);
        assert_eq!(f.store.authenticate(&f.basic).unwrap().id, f.task_id);
        assert_eq!(f.store.authenticate(&f.bearer).unwrap().id, f.task_id);
        assert_eq!(
            f.store.authenticate(&f.unknown).err(),
            Some(Reason::InvalidToken)
        );
        for (name, headers) in [
            ("basic", &f.basic),
            ("bearer", &f.bearer),
            ("unknown_task", &f.unknown),
        ] {
            group.bench_with_input(BenchmarkId::new(name, n), headers, |b, h| {
                b.iter(|| f.store.authenticate(black_box(h)))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_tokens);
criterion_main!(benches);
