//! `decide()` on a small policy (4 capabilities, 10 routes) and a generated large one (1,000
//! capabilities, 10,000 routes over 20 APIs), in one group so both show side by side:
//! `decide/<case>/<small|large>`. Cases: an allowed request (`hit`), a path no route matches
//! (`miss`), a refused method (`denied_method`), a broken constraint (`denied_constraint`), and
//! an allowed request by a task whose intent holds every capability, matching one late in it
//! (`wide_hit_late`). Inputs and expected results: `support/inputs.rs`.
//!
//!     cargo bench --bench decide -- --warm-up-time 1 --measurement-time 3

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/gen_policy.rs"]
mod gen_policy;
#[path = "support/inputs.rs"]
mod inputs;

use std::hint::black_box;
use std::time::SystemTime;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use gen_policy::Spec;
use keyward::decide::{decide, RequestFacts};
use keyward::policy::Scheme;

fn bench_decide(c: &mut Criterion) {
    let fixtures = [
        inputs::decide_fixture("small", &Spec::small()),
        inputs::decide_fixture("large", &Spec::large()),
    ];
    let now = SystemTime::now();
    let mut group = c.benchmark_group("decide");
    for i in 0..fixtures[0].cases.len() {
        for f in &fixtures {
            let case = &f.cases[i];
            assert_eq!(f.run(case, now), case.expect, "{}/{}", case.name, f.label);
            let task = f.task(case);
            let facts = RequestFacts {
                scheme: Scheme::Https,
                host: &case.host,
                port: case.port,
                method: &case.method,
                path: &case.path,
            };
            group.bench_with_input(BenchmarkId::new(case.name, f.label), &facts, |b, facts| {
                b.iter(|| decide(black_box(&f.policy), black_box(task), black_box(facts), now))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench_decide);
criterion_main!(benches);
