//! Calls `decide()` a fixed number of times on one bench case, for instruction counts under
//! callgrind (stable on a shared, noisy machine, unlike wall time). Same inputs as
//! `benches/decide.rs`; the per-call figure is (Ir with N calls − Ir with 0 calls) / N:
//!
//! ```sh
//! cargo build --release --example decide_loop
//! for n in 0 10000; do
//!   valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.$n \
//!     target/release/examples/decide_loop wide_hit_late large $n 2>&1 | grep 'refs:'
//! done
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../benches/support/gen_policy.rs"]
mod gen_policy;
#[path = "../benches/support/inputs.rs"]
mod inputs;

use std::hint::black_box;
use std::time::SystemTime;

use gen_policy::Spec;
use keyward::decide::{decide, RequestFacts};
use keyward::policy::Scheme;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [case, size, n] = &args[..] else {
        eprintln!("usage: decide_loop CASE small|large N   (CASE as in benches/decide.rs)");
        std::process::exit(1);
    };
    let spec = if size == "large" {
        Spec::large()
    } else {
        Spec::small()
    };
    let fixture = inputs::decide_fixture("x", &spec);
    let case = fixture
        .cases
        .iter()
        .find(|c| c.name == case)
        .expect("unknown case");
    let now = SystemTime::now();
    assert_eq!(fixture.run(case, now), case.expect);
    let task = fixture.task(case);
    let facts = RequestFacts {
        scheme: Scheme::Https,
        host: &case.host,
        port: case.port,
        method: &case.method,
        path: &case.path,
    };
    for _ in 0..n.parse::<u64>().unwrap() {
        let _ = black_box(decide(
            black_box(&fixture.policy),
            black_box(task),
            black_box(&facts),
            now,
        ));
    }
}
