//! The audit writer: `AuditLog::write` of realistic records (serialize + hash on the caller,
//! chain + write on the writer thread) into a fresh temp file, then `close` (flush + fsync),
//! reported as records/s (`audit/write_file`, batches of `AUDIT_BATCH`). For the split,
//! `audit/serialize_json` times the record's JSON alone, and `metrics/decision` one
//! `keyward_decisions_total` label lookup + increment (done once per request with the record).
//!
//!     cargo bench --bench audit -- --warm-up-time 1 --measurement-time 3

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "support/gen_policy.rs"]
mod gen_policy;
#[path = "support/inputs.rs"]
mod inputs;

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use keyward::audit::{verify_chain, AuditLog};
use keyward::metrics::Metrics;
use keyward::policy::AuditTarget;

async fn write_batch(path: &std::path::Path, metrics: &Metrics, n: u64) -> Duration {
    let log = AuditLog::open(&AuditTarget::File(path.to_owned()), 4096, metrics)
        .await
        .unwrap();
    let record = inputs::audit_record(0);
    let started = Instant::now();
    for i in 0..n {
        let mut rec = record.clone();
        rec.request_id = format!("9f3c0a1b{i:012x}");
        // An allowed request's record: handed over without waiting for the write.
        log.write_detached(rec);
    }
    log.close().await;
    let took = started.elapsed();
    assert!(log.healthy() && log.records_written() == n);
    took
}

fn bench_audit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new().unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let check = dir.path().join("check.jsonl");
    rt.block_on(write_batch(&check, &metrics, 100));
    let file = std::io::BufReader::new(std::fs::File::open(&check).unwrap());
    assert_eq!(verify_chain(file).unwrap(), 100);

    let mut group = c.benchmark_group("audit");
    group.throughput(Throughput::Elements(inputs::AUDIT_BATCH));
    group.sample_size(10);
    let mut run = 0u64;
    group.bench_function("write_file", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                run += 1;
                let path = dir.path().join(format!("audit-{run}.jsonl"));
                total += rt.block_on(write_batch(&path, &metrics, inputs::AUDIT_BATCH));
                std::fs::remove_file(&path).unwrap();
            }
            total
        })
    });
    group.finish();

    // A denial's record: the caller waits until it is written (SPEC §7: before the denial is
    // sent). One round trip to the writer thread and one write(2).
    let mut group = c.benchmark_group("audit");
    group.throughput(Throughput::Elements(1));
    let acked = dir.path().join("acked.jsonl");
    let log = rt
        .block_on(AuditLog::open(&AuditTarget::File(acked), 4096, &metrics))
        .unwrap();
    group.bench_function("write_acked", |b| {
        b.iter(|| rt.block_on(log.write(inputs::audit_record(2))))
    });
    rt.block_on(log.close());
    group.finish();

    let mut group = c.benchmark_group("audit");
    group.throughput(Throughput::Elements(1));
    let record = inputs::audit_record(1);
    group.bench_function("serialize_json", |b| {
        b.iter(|| serde_json::to_vec(black_box(&record)).unwrap())
    });
    group.finish();

    let mut group = c.benchmark_group("metrics");
    group.bench_function("decision", |b| {
        b.iter(|| {
            metrics.decision(
                black_box("allow"),
                black_box("allowed"),
                black_box("forge"),
                black_box("forge.issues.read"),
                black_box("bench-agent"),
            )
        })
    });
    group.finish();
}

criterion_group!(benches, bench_audit);
criterion_main!(benches);
