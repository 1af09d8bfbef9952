//! Every input of the criterion benches (`benches/`) gives the result the bench assumes: the
//! generated policies are valid and as large as claimed, each `decide` case allows or refuses as
//! expected, canonicalization, token lookup, leaf issuance and the audit chain behave. So
//! `cargo test` catches a bench that would time the wrong path.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../benches/support/gen_policy.rs"]
mod gen_policy;
#[path = "../benches/support/inputs.rs"]
mod inputs;

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use gen_policy::{generate, Harness, Spec};
use keyward::audit::{verify_chain, AuditLog};
use keyward::metrics::Metrics;
use keyward::policy::AuditTarget;
use keyward::reason::Reason;
use keyward::tls::{CertAuthority, LeafCache};

#[test]
fn generated_policies_are_valid_and_exact() {
    for spec in [Spec::small(), Spec::large()] {
        let generated = generate(&spec);
        assert_eq!(generated.capabilities.len(), spec.capabilities);
        assert_eq!(generated.route_count, spec.routes);
        let policy = inputs::compile(&generated);
        assert_eq!(policy.route_count(), spec.routes);
        assert_eq!(policy.policy().capabilities.len(), spec.capabilities);
        assert_eq!(policy.policy().services.len(), spec.services);
        assert_eq!(generate(&spec).yaml, generated.yaml, "deterministic");
    }
}

#[test]
fn harness_policy_is_valid_and_covers_the_origin() {
    // `tls.ca_file` is read when the policy is checked: the origin's CA must exist.
    let dir = tempfile::tempdir().unwrap();
    let origin_ca = dir.path().join("origin-ca.pem");
    keyward::tls::ca::CertAuthority::create(&origin_ca, &dir.path().join("origin-ca.key")).unwrap();
    let spec = Spec {
        harness: Some(Harness {
            proxy_listen: "127.0.0.1:14000".into(),
            admin_listen: "127.0.0.1:14001".into(),
            ca_cert: "/b/certs/proxy-ca.pem".into(),
            ca_key: "/b/ca.key".into(),
            audit: "/b/audit.jsonl".into(),
            origin_host: "localhost".into(),
            origin_https_port: 18443,
            origin_http_port: 18080,
            origin_ca: origin_ca.to_str().unwrap().into(),
            passthrough: vec!["127.0.0.1".into()],
        }),
        ..Spec::large()
    };
    let generated = generate(&spec);
    assert_eq!(generated.route_count, 10_000);
    let policy = inputs::compile(&generated);
    assert_eq!(policy.route_count(), 10_000);
    assert_eq!(generated.credential_envs.len(), spec.services + 2);
    assert!(policy.is_passthrough("127.0.0.1"));
    let origin = generated.capability("origin.bench.read").unwrap();
    assert_eq!((origin.scheme, origin.port), ("https", 18443));
    assert_eq!(&origin.routes[..2], ["GET /v1/small", "GET /v1/large"]);
    let plain = generated.capability("origin-http.bench.read").unwrap();
    assert_eq!((plain.scheme, plain.port), ("http", 18080));
    // The origin capabilities come last, so a max intent in policy order has them last.
    let n = generated.capabilities.len();
    assert_eq!(generated.capabilities[n - 1].name, "origin-http.bench.read");
    assert_eq!(generated.capabilities[n - 2].name, "origin.bench.read");
}

#[test]
fn decide_cases_decide_as_the_bench_assumes() {
    let now = SystemTime::now();
    for (label, spec) in [("small", Spec::small()), ("large", Spec::large())] {
        let f = inputs::decide_fixture(label, &spec);
        assert_eq!(f.wide.intent.len(), spec.capabilities);
        for case in &f.cases {
            assert_eq!(f.run(case, now), case.expect, "{}/{label}", case.name);
        }
    }
}

#[test]
fn canon_cases_canonicalize_as_the_bench_assumes() {
    for (name, target, expect) in inputs::CANON_CASES {
        assert_eq!(inputs::canon_result(target), expect, "{name}");
    }
}

#[test]
fn token_cases_authenticate_as_the_bench_assumes() {
    let generated = generate(&Spec::large());
    let policy = inputs::compile(&generated);
    for live in [10, 100_000] {
        let f = inputs::token_fixture(&policy, &generated, live);
        assert_eq!(f.store.len(), live);
        assert_eq!(f.store.authenticate(&f.basic).unwrap().id, f.task_id);
        assert_eq!(f.store.authenticate(&f.bearer).unwrap().id, f.task_id);
        assert_eq!(
            f.store.authenticate(&f.unknown).err(),
            Some(Reason::InvalidToken)
        );
    }
}

#[tokio::test]
async fn leaf_hit_reuses_and_miss_issues() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Arc::new(
        CertAuthority::create(&dir.path().join("ca.pem"), &dir.path().join("ca-key.pem")).unwrap(),
    );
    let [a, b] = inputs::LEAF_HOSTS;
    let warm = LeafCache::new(ca.clone(), 1024).unwrap();
    let first = warm.server_config(a).await.unwrap();
    let again = warm.server_config(a).await.unwrap();
    assert!(Arc::ptr_eq(&first, &again));
    assert_eq!(warm.issued_total(), 1);
    let cold = LeafCache::new(ca, 1).unwrap();
    for host in [a, b, a, b] {
        cold.server_config(host).await.unwrap();
    }
    assert_eq!(
        cold.issued_total(),
        4,
        "capacity 1: every alternate host is issued again"
    );
}

#[tokio::test]
async fn audit_records_chain_and_reach_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let metrics = Metrics::new().unwrap();
    let log = AuditLog::open(&AuditTarget::File(path.clone()), 4096, &metrics)
        .await
        .unwrap();
    for i in 0..1000 {
        log.write(inputs::audit_record(i)).await;
    }
    log.close().await;
    assert!(log.healthy());
    assert_eq!(log.records_written(), 1000);
    let file = std::io::BufReader::new(std::fs::File::open(&path).unwrap());
    assert_eq!(verify_chain(file).unwrap(), 1000);
    let first = std::fs::read_to_string(Path::new(&path)).unwrap();
    let line: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert_eq!(line["capability"], "forge.issues.read");
    assert_eq!(line["seq"], 1);
}
