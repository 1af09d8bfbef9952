//! The response redactor over a clean 1 MiB body in 16 KiB frames (the common case: nothing to
//! replace, every frame scanned for every spelling of the injected credential), reported as
//! bytes/s, and over small bodies (one SSE-sized frame).
//!
//!     cargo bench --bench redact -- --warm-up-time 1 --measurement-time 3

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::hint::black_box;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use keyward::credentials::CredentialValue;
use keyward::policy::Injection;
use keyward::proxy::redact::Redactor;
use keyward::secret::Secret;

fn bench_redact(c: &mut Criterion) {
    let value = Arc::new(CredentialValue::new(Secret::new(
        "sk_live_4eC39HqLyjWDarjtT1zdp7dc".into(),
    )));
    let header = Injection::Header {
        name: http::header::AUTHORIZATION,
        prefix: "Bearer ".into(),
        suffix: String::new(),
        credential: 0,
    };
    // JSON-ish text: the bytes an API answers with.
    let text: Vec<u8> =
        br#"{"id":"evt_1NaXhF2eZvKYlo2C","object":"event","data":{"amount":2000}},"#
            .iter()
            .copied()
            .cycle()
            .take(1 << 20)
            .collect();
    let frames: Vec<Bytes> = text.chunks(16 * 1024).map(Bytes::copy_from_slice).collect();

    let mut group = c.benchmark_group("redact");
    group.throughput(Throughput::Bytes(text.len() as u64));
    group.bench_function("clean_1mib", |b| {
        b.iter(|| {
            let mut r = Redactor::for_injection(&header, value.clone());
            let mut out = 0;
            for f in &frames {
                out += r.push(black_box(f.clone())).len();
            }
            out + r.finish().len()
        })
    });
    group.finish();

    let mut group = c.benchmark_group("redact");
    let event = Bytes::from_static(b"data: {\"delta\":\"Hello\",\"index\":42}\n\n");
    group.throughput(Throughput::Bytes(event.len() as u64));
    group.bench_function("small_frame", |b| {
        b.iter(|| {
            let mut r = Redactor::for_injection(&header, value.clone());
            r.push(black_box(event.clone())).len() + r.finish().len()
        })
    });
    group.finish();
}

criterion_group!(benches, bench_redact);
criterion_main!(benches);
