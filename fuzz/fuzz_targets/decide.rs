//! A fixed policy (policy/example.yaml, compiled once) and a minted task; arbitrary method,
//! host, port and request target → `decide` must not panic, and an allowed decision must be
//! explainable from the policy by hand: the permitted route matches the canonical path
//! (reference matcher) and names the method, its capability is in the task's intent and the
//! agent's grants, serves the host, is not high-risk, and the task's constraints hold.
//!
//! Input: `METHOD\nHOST\nTARGET`; the first byte also picks scheme and port.

#![no_main]

mod common;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use http::Method;
use keyward::decide::{decide, decide_connect, normalize_host, RequestFacts};
use keyward::matcher::canon::canonicalize;
use keyward::policy::{self, CompiledPolicy, HostPattern, Risk, Scheme};
use keyward::reason::Reason;
use keyward::tasks::{Grant, MintSpec, Task, TaskStore};
use libfuzzer_sys::fuzz_target;

const POLICY: &str = include_str!("../../policy/example.yaml");

struct Fixture {
    policy: CompiledPolicy,
    task: Arc<Task>,
    now: SystemTime,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let parsed = policy::parse("example.yaml", POLICY, Path::new("/nonexistent"))
            .unwrap_or_else(|e| panic!("the example policy does not load: {e}"));
        let policy = CompiledPolicy::compile(parsed);
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let grant = |cap: &str, constraints: &[(&str, &[&str])]| Grant {
            capability: cap.into(),
            constraints: constraints
                .iter()
                .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
                .collect(),
        };
        // Constrained reads, an unconstrained write, one API of two: every reason is reachable.
        let intent = vec![
            grant(
                "github.issues.read",
                &[("owner", &["acme"]), ("repo", &["web", "api"])],
            ),
            grant("github.issues.comment", &[]),
            grant("openai.chat", &[]),
        ];
        let spec = MintSpec {
            agent: "triage-bot".into(),
            task: Some("fuzz-task".into()),
            intent,
            ttl: Some(Duration::from_secs(600)),
            max_requests: None,
        };
        let (task, _token) = TaskStore::new()
            .mint(&policy, spec, now)
            .unwrap_or_else(|e| panic!("cannot mint the fuzz task: {e}"));
        Fixture { policy, task, now }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let mut parts = rest.splitn(3, |&b| b == b'\n');
    let method = parts.next().unwrap_or_default();
    let host = String::from_utf8_lossy(parts.next().unwrap_or_default());
    let target = String::from_utf8_lossy(parts.next().unwrap_or_default());

    let (scheme, port) = match selector % 4 {
        0 | 1 => (Scheme::Https, 443),
        2 => (Scheme::Http, 80),
        _ => (Scheme::Https, u16::from(selector)),
    };
    let Some(host) = normalize_host(&host) else {
        return;
    };
    // CONNECT is decided by host alone; it must not panic either, and it intercepts only hosts
    // of the policy.
    let connect = decide_connect(&f.policy, &f.task, &host, port, f.now);
    if connect.is_ok() {
        assert!(
            serves(&f.policy, &host) || f.policy.is_passthrough(&host),
            "CONNECT to unknown host {host:?} allowed"
        );
    }
    let Ok(method) = Method::from_bytes(method) else {
        return;
    };
    let Ok(path) = canonicalize(&target) else {
        return;
    };
    let facts = RequestFacts {
        scheme,
        host: &host,
        port,
        method: &method,
        path: &path,
    };
    let decision = decide(&f.policy, &f.task, &facts, f.now);
    // Pure: the same facts give the same decision.
    assert_eq!(decision, decide(&f.policy, &f.task, &facts, f.now));
    // After expiry nothing is allowed.
    let late = f.task.expires_at;
    assert_eq!(
        decide(&f.policy, &f.task, &facts, late).map_err(|d| d.reason),
        Err(Reason::TaskExpired)
    );

    let permit = match decision {
        Ok(permit) => permit,
        Err(denial) => {
            assert_ne!(denial.reason, Reason::Allowed);
            return;
        }
    };

    let cap = f.policy.capability_at(permit.capability());
    assert_eq!(cap.service, permit.service());
    let service = f.policy.service_at(permit.service());
    assert_eq!((service.scheme, service.port), (scheme, port));
    assert!(
        service.hosts.iter().any(|h| host_matches(h, &host)),
        "{host:?} allowed for service {} that does not serve it",
        service.name
    );
    assert!(
        matches!(cap.risk, Risk::Low | Risk::Medium),
        "{} allowed",
        cap.name
    );

    let route = &cap.routes[permit.route()];
    assert!(
        route.methods.contains(&method),
        "{method} allowed by {route}"
    );
    let segs = common::segments(&path);
    let Some(caps) = common::reference_match(route, &segs) else {
        panic!("{target:?} allowed by {route}, which does not match it");
    };

    let agent = f
        .policy
        .agent(&f.task.agent)
        .unwrap_or_else(|| panic!("agent vanished"));
    assert!(agent.capabilities.contains(&permit.capability()));
    let grant = f.task.intent.iter().find(|g| g.capability == cap.name);
    let Some(grant) = grant else {
        panic!("{} allowed but not in the task's intent", cap.name);
    };
    let names: Vec<&str> = route.param_names().collect();
    for (param, allowed) in &grant.constraints {
        let Some(k) = names.iter().position(|n| n == param) else {
            panic!("{route} allowed without parameter {param} that the task constrains");
        };
        let (s, e) = caps[k];
        let value = segs[s..e].join("/");
        assert!(
            allowed.contains(&value),
            "{param}={value:?} allowed against constraint {allowed:?}"
        );
    }
});

fn serves(policy: &CompiledPolicy, host: &str) -> bool {
    policy
        .policy()
        .services
        .iter()
        .any(|s| s.hosts.iter().any(|h| host_matches(h, host)))
}

/// Exact names match themselves; `*.parent` matches exactly one label in front of `parent`.
fn host_matches(pattern: &HostPattern, host: &str) -> bool {
    match pattern {
        HostPattern::Exact(name) => name == host,
        HostPattern::Wildcard(parent) => host
            .strip_suffix(parent.as_str())
            .and_then(|front| front.strip_suffix('.'))
            .is_some_and(|label| !label.is_empty() && !label.contains('.')),
    }
}
