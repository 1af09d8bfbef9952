//! `tls::leaf::LeafCache::server_config`: a cache hit (every intercepted CONNECT after the first
//! to a host) and a miss that signs a new leaf (a cache of capacity 1 alternating two hosts, so
//! every call evicts and issues). A hit's future is ready at its first poll, so it is polled
//! once in place (`now_or_never`, no runtime in the figure); issuing runs on a current-thread
//! tokio runtime (`block_on` costs well under 1 µs, against tens of µs of signing).
//!
//!     cargo bench --bench leaf -- --warm-up-time 1 --measurement-time 3

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/gen_policy.rs"]
mod gen_policy;
#[path = "support/inputs.rs"]
mod inputs;

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::FutureExt as _;
use keyward::tls::{CertAuthority, LeafCache};

fn bench_leaf(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(
        CertAuthority::create(&dir.path().join("ca.pem"), &dir.path().join("ca-key.pem")).unwrap(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let [host_a, host_b] = inputs::LEAF_HOSTS;

    let warm = LeafCache::new(ca.clone(), 1024).unwrap();
    let first = rt.block_on(warm.server_config(host_a)).unwrap();
    let again = rt.block_on(warm.server_config(host_a)).unwrap();
    assert!(Arc::ptr_eq(&first, &again) && warm.issued_total() == 1);

    let cold = LeafCache::new(ca, 1).unwrap();
    rt.block_on(cold.server_config(host_a)).unwrap();
    rt.block_on(cold.server_config(host_b)).unwrap();
    assert_eq!(cold.issued_total(), 2);

    let mut group = c.benchmark_group("leaf");
    group.bench_function("hit", |b| {
        b.iter(
            || match warm.server_config(black_box(host_a)).now_or_never() {
                Some(config) => config.unwrap(),
                None => panic!("a cached leaf must not wait"),
            },
        )
    });
    let mut flip = false;
    group.bench_function("miss_issue", |b| {
        b.iter(|| {
            flip = !flip;
            let host = if flip { host_a } else { host_b };
            rt.block_on(cold.server_config(black_box(host))).unwrap()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_leaf);
criterion_main!(benches);
