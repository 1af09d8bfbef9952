//! Inputs of the criterion benches and the result each must produce. The benches include this
//! file and assert every result once before timing it; `tests/bench_inputs.rs` includes it too
//! and asserts the same results under `cargo test`, so a bench can never silently time an
//! error path (a refused request is ~10x cheaper than an allowed one).
//!
//! Include it next to `gen_policy.rs` (it refers to `crate::gen_policy`).

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

use base64::Engine as _;
use http::{HeaderMap, HeaderValue, Method};
use keyward::audit::AuditRecord;
use keyward::matcher::canon::{canonicalize, Ambiguity, CanonPath};
use keyward::policy::{self, CompiledPolicy, Scheme};
use keyward::reason::Reason;
use keyward::tasks::{Grant, MintSpec, Task, TaskStore};

use crate::gen_policy::{concrete_path, generate, Generated, Spec};

/// Parses and compiles a generated policy (panics if the generator produced an invalid one).
pub fn compile(generated: &Generated) -> CompiledPolicy {
    let policy = policy::parse("bench.yaml", &generated.yaml, Path::new("/nonexistent"))
        .unwrap_or_else(|e| panic!("generated policy rejected:\n{e}"));
    CompiledPolicy::compile(policy)
}

fn grant(cap: &str, constraints: &[(&str, &str)]) -> Grant {
    Grant {
        capability: cap.to_string(),
        constraints: constraints
            .iter()
            .map(|(k, v)| (k.to_string(), vec![v.to_string()]))
            .collect(),
    }
}

pub fn mint(
    store: &TaskStore,
    policy: &CompiledPolicy,
    agent: &str,
    intent: Vec<Grant>,
) -> (Arc<Task>, String) {
    let (task, token) = store
        .mint(
            policy,
            MintSpec {
                agent: agent.into(),
                task: None,
                intent,
                ttl: None,
                max_requests: None,
            },
            SystemTime::now(),
        )
        .unwrap();
    (task, token.expose().to_string())
}

// ------------------------------------------------------------------------------------ decide

/// One request for `decide`, and the capability that must allow it or the reason it is refused.
pub struct DecideCase {
    pub name: &'static str,
    /// Which task asks: the narrow one (a handful of capabilities) or the wide one (all of them).
    pub wide: bool,
    pub host: String,
    pub port: u16,
    pub method: Method,
    pub path: CanonPath,
    pub expect: Result<String, Reason>,
}

pub struct DecideFixture {
    pub label: &'static str,
    pub generated: Generated,
    pub policy: CompiledPolicy,
    /// `forge.issues.read` constrained to acme/web, plus up to four unrelated capabilities.
    pub narrow: Arc<Task>,
    /// Every capability of `bench-agent`, in policy order (the intent `candidate.sh` mints).
    pub wide: Arc<Task>,
    pub cases: Vec<DecideCase>,
}

/// The decide fixture for `Spec::small()` ("small") or `Spec::large()` ("large").
pub fn decide_fixture(label: &'static str, spec: &Spec) -> DecideFixture {
    let generated = generate(spec);
    let policy = compile(&generated);
    let store = TaskStore::new();
    let target = "forge.issues.read";
    let mut narrow_intent = vec![grant(target, &[("owner", "acme"), ("repo", "web")])];
    narrow_intent.extend(
        generated
            .capabilities
            .iter()
            .filter(|c| c.name != target && c.risk == "low")
            .step_by(7)
            .take(4)
            .map(|c| grant(&c.name, &[])),
    );
    let (narrow, _) = mint(&store, &policy, "bench-agent", narrow_intent);
    let wide_intent = generated
        .capabilities
        .iter()
        .map(|c| grant(&c.name, &[]))
        .collect();
    let (wide, _) = mint(&store, &policy, "bench-agent", wide_intent);

    let cap = generated.capability(target).unwrap();
    let item = concrete_path(&cap.routes[1]); // GET /repos/{owner}/{repo}/issues/{id}
    assert_eq!(item, "/repos/acme/web/issues/42");
    // The last read capability of the same API: late in the wide intent.
    let late = generated
        .capabilities
        .iter()
        .rev()
        .find(|c| c.service == cap.service && c.name.ends_with(".read"))
        .unwrap();
    let case = |name, wide, method: Method, path: &str, expect: Result<&str, Reason>| DecideCase {
        name,
        wide,
        host: cap.host.clone(),
        port: cap.port,
        method,
        path: canonicalize(path).unwrap(),
        expect: expect.map(str::to_string),
    };
    let cases = vec![
        case("hit", false, Method::GET, &item, Ok(target)),
        case(
            "miss",
            false,
            Method::GET,
            "/repos/acme/web/nonexistent/42",
            Err(Reason::RouteNotInIntent),
        ),
        case(
            "denied_method",
            false,
            Method::DELETE,
            &item,
            Err(Reason::MethodNotAllowed),
        ),
        case(
            "denied_constraint",
            false,
            Method::GET,
            "/repos/evil/web/issues/42",
            Err(Reason::ConstraintMismatch),
        ),
        case(
            "wide_hit_late",
            true,
            Method::GET,
            &concrete_path(&late.routes[1]),
            Ok(&late.name),
        ),
    ];
    DecideFixture {
        label,
        generated,
        policy,
        narrow,
        wide,
        cases,
    }
}

impl DecideFixture {
    pub fn task(&self, case: &DecideCase) -> &Task {
        if case.wide {
            &self.wide
        } else {
            &self.narrow
        }
    }

    /// Runs `decide` for a case: the capability name that allowed it, or the reason.
    pub fn run(&self, case: &DecideCase, now: SystemTime) -> Result<String, Reason> {
        let facts = keyward::decide::RequestFacts {
            scheme: Scheme::Https,
            host: &case.host,
            port: case.port,
            method: &case.method,
            path: &case.path,
        };
        keyward::decide::decide(&self.policy, self.task(case), &facts, now)
            .map(|p| self.policy.capability_at(p.capability()).name.clone())
            .map_err(|d| d.reason)
    }
}

// ------------------------------------------------------------------------------------- canon

/// Typical request targets and their segment count (or why they are refused).
pub const CANON_CASES: [(&str, &str, Result<usize, Ambiguity>); 7] = [
    ("llm_chat", "/v1/chat/completions", Ok(3)),
    ("rest_item", "/repos/acme/web/issues/42/comments", Ok(6)),
    (
        "with_query",
        "/repos/acme/web/issues?state=open&per_page=100&page=3",
        Ok(4),
    ),
    (
        "percent_unreserved",
        "/repos/acme/web/contents/docs/%7Euser/read%20me%2Emd",
        Ok(7),
    ),
    (
        "deep_20_segments",
        "/a1/b2/c3/d4/e5/f6/g7/h8/i9/j10/k11/l12/m13/n14/o15/p16/q17/r18/s19/t20",
        Ok(20),
    ),
    (
        "refused_dot_segment",
        "/repos/acme/web/../admin/keys",
        Err(Ambiguity::DotSegment),
    ),
    (
        "refused_encoded_slash",
        "/repos/acme%2Fweb/issues",
        Err(Ambiguity::EncodedSlash),
    ),
];

pub fn canon_result(target: &str) -> Result<usize, Ambiguity> {
    canonicalize(target).map(|p| p.len())
}

// ------------------------------------------------------------------------------------ tokens

/// A task store holding `live` tasks of `agent-0`, and the credentials of one in the middle.
pub struct TokenFixture {
    pub store: TaskStore,
    pub task_id: String,
    pub basic: HeaderMap,
    pub bearer: HeaderMap,
    /// A well-formed Basic header naming an unknown task.
    pub unknown: HeaderMap,
}

pub fn token_fixture(policy: &CompiledPolicy, generated: &Generated, live: usize) -> TokenFixture {
    let store = TaskStore::new();
    let cap = &generated.capabilities[0].name;
    let mut chosen = None;
    for i in 0..live {
        let (task, token) = mint(&store, policy, "agent-0", vec![grant(cap, &[])]);
        if i == live / 2 {
            chosen = Some((task.id.clone(), token));
        }
    }
    let (task_id, token) = chosen.unwrap();
    let header = |v: String| {
        let mut h = HeaderMap::new();
        h.insert(
            http::header::PROXY_AUTHORIZATION,
            HeaderValue::from_str(&v).unwrap(),
        );
        h
    };
    let b64 = |s: String| base64::engine::general_purpose::STANDARD.encode(s);
    TokenFixture {
        basic: header(format!("Basic {}", b64(format!("{task_id}:{token}")))),
        bearer: header(format!("Bearer {token}")),
        unknown: header(format!(
            "Basic {}",
            b64(format!("task-ffffffffffffffff:{token}"))
        )),
        store,
        task_id,
    }
}

// ------------------------------------------------------------------------------------- audit

/// A realistic record of an allowed, forwarded request (what the proxy writes per request).
pub fn audit_record(i: u64) -> AuditRecord {
    AuditRecord {
        ts: String::new(),
        request_id: format!("9f3c0a1b{i:012x}"),
        task: Some("task-3fa85f6457174562".into()),
        agent: Some("bench-agent".into()),
        decision: "allow",
        reason: "allowed",
        method: "GET".into(),
        scheme: "https",
        host: "api.forge.bench.example".into(),
        port: Some(443),
        path: "/repos/acme/web/issues/42/comments".into(),
        service: Some("forge".into()),
        capability: Some("forge.issues.read".into()),
        route: Some("GET /repos/{owner}/{repo}/issues/{id}/comments".into()),
        risk: Some("low"),
        credential: Some("key_0".into()),
        status: 200,
        upstream_ms: Some(12.345),
        bytes_up: 0,
        bytes_down: 2048,
        client: "127.0.0.1:51234".into(),
        policy_version: "0123456789abcdef".into(),
        outcome: Some("completed"),
        detail: None,
    }
}

/// Records written per timed batch of the audit bench.
pub const AUDIT_BATCH: u64 = 20_000;

/// The hosts of the leaf bench.
pub const LEAF_HOSTS: [&str; 2] = ["api.forge.bench.example", "api.tracker.bench.example"];
