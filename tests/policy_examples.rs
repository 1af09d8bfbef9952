//! The example policies in `policy/` load, and their capability bundles decide real API requests
//! the way their comments promise: reads allowed, writes and admin routes refused, branch pins
//! and risk tiers enforced. Decisions come from the same pure `decide` the proxy uses.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::time::SystemTime;

use http::Method;
use keyward::decide::{decide, decide_connect, ConnectDecision, RequestFacts};
use keyward::matcher::canon::canonicalize;
use keyward::policy::{self, CompiledPolicy, Scheme};
use keyward::reason::Reason;
use keyward::tasks::{Grant, MintSpec, Task, TaskStore};

fn example(name: &str) -> CompiledPolicy {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("policy")
        .join(name);
    CompiledPolicy::compile(policy::load(&path).unwrap_or_else(|e| panic!("{e}")))
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

fn task(policy: &CompiledPolicy, agent: &str, intent: Vec<Grant>) -> std::sync::Arc<Task> {
    TaskStore::new()
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
        .unwrap()
        .0
}

/// The reason keyward gives for `METHOD https://host/path`, and the capability that allowed it.
fn check(
    policy: &CompiledPolicy,
    task: &Task,
    method: &str,
    host: &str,
    path: &str,
) -> (Reason, Option<String>) {
    let path = canonicalize(path).unwrap();
    let method = Method::from_bytes(method.as_bytes()).unwrap();
    let facts = RequestFacts {
        scheme: Scheme::Https,
        host,
        port: 443,
        method: &method,
        path: &path,
    };
    match decide(policy, task, &facts, SystemTime::now()) {
        Ok(p) => (
            Reason::Allowed,
            Some(policy.capability_at(p.capability()).name.clone()),
        ),
        Err(d) => (
            d.reason,
            d.hint.map(|h| policy.capability_at(h).name.clone()),
        ),
    }
}

#[test]
fn every_example_policy_loads() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policy");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "yaml") {
            policy::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 2);
}

#[test]
fn coding_agent_reads_a_repository_but_cannot_write_to_it() {
    let p = example("coding-agent.yaml");
    let t = task(
        &p,
        "coding-agent",
        vec![grant(
            "github.repo.read",
            &[("owner", "acme"), ("repo", "web")],
        )],
    );
    let gh = "api.github.com";
    assert_eq!(
        check(&p, &t, "GET", gh, "/repos/acme/web/contents/src/main.rs").0,
        Reason::Allowed
    );
    assert_eq!(
        check(
            &p,
            &t,
            "GET",
            gh,
            "/repos/acme/web/git/trees/abc123?recursive=1"
        )
        .0,
        Reason::Allowed
    );
    assert_eq!(
        check(
            &p,
            &t,
            "GET",
            gh,
            "/repos/acme/web/compare/main...feature/x"
        )
        .0,
        Reason::Allowed
    );
    // Another repository of the same owner is outside the task's constraint.
    assert_eq!(
        check(&p, &t, "GET", gh, "/repos/acme/secrets/contents/a").0,
        Reason::ConstraintMismatch
    );
    // Writes on a read route: the method is the problem.
    assert_eq!(
        check(&p, &t, "DELETE", gh, "/repos/acme/web").0,
        Reason::MethodNotAllowed
    );
    // Admin surface is in no bundle at all.
    assert_eq!(
        check(&p, &t, "GET", gh, "/repos/acme/web/actions/secrets").0,
        Reason::RouteNotInIntent
    );
    assert_eq!(
        check(&p, &t, "PUT", gh, "/repos/acme/web/collaborators/mallory").0,
        Reason::RouteNotInIntent
    );
}

#[test]
fn a_denial_suggests_only_capabilities_the_agent_may_hold() {
    let p = example("coding-agent.yaml");
    // Opening a pull request is `github.pulls.open`, which coding-agent may hold and
    // review-bot may not: only coding-agent is told to ask for it.
    let path = "/repos/acme/web/pulls";
    let coder = task(&p, "coding-agent", vec![grant("github.issues.read", &[])]);
    let (reason, hint) = check(&p, &coder, "POST", "api.github.com", path);
    assert_eq!(hint.as_deref(), Some("github.pulls.open"), "{reason:?}");
    let reviewer = task(&p, "review-bot", vec![grant("github.issues.read", &[])]);
    assert_eq!(
        check(&p, &reviewer, "POST", "api.github.com", path),
        (reason, None)
    );
}

#[test]
fn coding_agent_comments_without_admin_rights_and_learns_what_to_ask_for() {
    let p = example("coding-agent.yaml");
    let t = task(&p, "coding-agent", vec![grant("github.issues.read", &[])]);
    let (reason, hint) = check(
        &p,
        &t,
        "POST",
        "api.github.com",
        "/repos/acme/web/issues/7/comments",
    );
    assert_eq!(reason, Reason::MethodNotAllowed);
    assert_eq!(hint.as_deref(), Some("github.comments.write"));
    let t = task(
        &p,
        "coding-agent",
        vec![grant("github.comments.write", &[])],
    );
    assert_eq!(
        check(
            &p,
            &t,
            "POST",
            "api.github.com",
            "/repos/acme/web/issues/7/comments"
        )
        .0,
        Reason::Allowed
    );
    // Closing, labelling or locking an issue is not commenting.
    assert_eq!(
        check(
            &p,
            &t,
            "PATCH",
            "api.github.com",
            "/repos/acme/web/issues/7"
        )
        .0,
        Reason::RouteNotInIntent
    );
    assert_eq!(
        check(
            &p,
            &t,
            "PUT",
            "api.github.com",
            "/repos/acme/web/issues/7/lock"
        )
        .0,
        Reason::RouteNotInIntent
    );
}

#[test]
fn coding_agent_pushes_to_one_branch_only() {
    let p = example("coding-agent.yaml");
    let repo = [("owner", "acme"), ("repo", "web")];
    let t = task(
        &p,
        "coding-agent",
        vec![
            grant("github.git.write", &repo),
            grant(
                "github.branch.update",
                &[
                    ("owner", "acme"),
                    ("repo", "web"),
                    ("branch", "agent/TICKET-123"),
                ],
            ),
        ],
    );
    let gh = "api.github.com";
    assert_eq!(
        check(&p, &t, "POST", gh, "/repos/acme/web/git/blobs").0,
        Reason::Allowed
    );
    assert_eq!(
        check(&p, &t, "POST", gh, "/repos/acme/web/git/commits").0,
        Reason::Allowed
    );
    assert_eq!(
        check(
            &p,
            &t,
            "PATCH",
            gh,
            "/repos/acme/web/git/refs/heads/agent/TICKET-123"
        )
        .0,
        Reason::Allowed
    );
    assert_eq!(
        check(&p, &t, "PATCH", gh, "/repos/acme/web/git/refs/heads/main").0,
        Reason::ConstraintMismatch
    );
    assert_eq!(
        check(
            &p,
            &t,
            "PATCH",
            gh,
            "/repos/acme/web/git/refs/heads/agent/TICKET-123x"
        )
        .0,
        Reason::ConstraintMismatch
    );
    assert_eq!(
        check(
            &p,
            &t,
            "DELETE",
            gh,
            "/repos/acme/web/git/refs/heads/agent/TICKET-123"
        )
        .0,
        Reason::MethodNotAllowed
    );
}

#[test]
fn merging_is_high_risk_and_needs_an_approval() {
    let p = example("coding-agent.yaml");
    let t = task(&p, "coding-agent", vec![grant("github.pulls.merge", &[])]);
    assert_eq!(
        check(
            &p,
            &t,
            "PUT",
            "api.github.com",
            "/repos/acme/web/pulls/9/merge"
        )
        .0,
        Reason::ApprovalRequired
    );
}

#[test]
fn ci_status_is_readable_but_deployments_are_not() {
    let p = example("coding-agent.yaml");
    let t = task(&p, "coding-agent", vec![grant("github.ci.read", &[])]);
    let gh = "api.github.com";
    assert_eq!(
        check(&p, &t, "GET", gh, "/repos/acme/web/commits/abc/check-runs").0,
        Reason::Allowed
    );
    assert_eq!(
        check(&p, &t, "GET", gh, "/repos/acme/web/actions/runs/42/jobs").0,
        Reason::Allowed
    );
    assert_eq!(
        check(&p, &t, "POST", gh, "/repos/acme/web/actions/runs/42/rerun").0,
        Reason::RouteNotInIntent
    );
    assert_eq!(
        check(&p, &t, "POST", gh, "/repos/acme/web/deployments").0,
        Reason::RouteNotInIntent
    );
    assert_eq!(
        check(
            &p,
            &t,
            "POST",
            gh,
            "/repos/acme/web/actions/workflows/ci.yml/dispatches"
        )
        .0,
        Reason::RouteNotInIntent
    );
}

#[test]
fn package_registries_are_readable_and_publishing_is_denied() {
    let p = example("coding-agent.yaml");
    let t = task(
        &p,
        "coding-agent",
        vec![grant("npm.read", &[]), grant("pypi.read", &[])],
    );
    assert_eq!(
        check(&p, &t, "GET", "registry.npmjs.org", "/left-pad").0,
        Reason::Allowed
    );
    assert_eq!(
        check(
            &p,
            &t,
            "GET",
            "registry.npmjs.org",
            "/left-pad/-/left-pad-1.3.0.tgz"
        )
        .0,
        Reason::Allowed
    );
    assert_eq!(
        check(&p, &t, "PUT", "registry.npmjs.org", "/left-pad").0,
        Reason::MethodNotAllowed
    );
    assert_eq!(
        check(&p, &t, "GET", "pypi.org", "/simple/requests/").0,
        Reason::Allowed
    );
    assert_eq!(
        check(&p, &t, "POST", "pypi.org", "/legacy/").0,
        Reason::RouteNotInIntent
    );
    // The upload host is not a service at all: CONNECT is refused before any TLS.
    assert_eq!(
        decide_connect(&p, &t, "upload.pypi.org", 443, SystemTime::now())
            .unwrap_err()
            .reason,
        Reason::UnknownHost
    );
    assert!(matches!(
        decide_connect(&p, &t, "pypi.org", 443, SystemTime::now()),
        Ok(ConnectDecision::Intercept { service: Some(s) }) if p.service_at(s).name == "pypi"
    ));
}

#[test]
fn llm_apis_only_generate() {
    let p = example("coding-agent.yaml");
    let t = task(
        &p,
        "coding-agent",
        vec![
            grant("openai.responses", &[]),
            grant("anthropic.messages", &[]),
        ],
    );
    assert_eq!(
        check(&p, &t, "POST", "api.openai.com", "/v1/chat/completions").0,
        Reason::Allowed
    );
    assert_eq!(
        check(&p, &t, "POST", "api.openai.com", "/v1/responses").0,
        Reason::Allowed
    );
    assert_eq!(
        check(&p, &t, "POST", "api.openai.com", "/v1/files").0,
        Reason::RouteNotInIntent
    );
    assert_eq!(
        check(&p, &t, "POST", "api.openai.com", "/v1/fine_tuning/jobs").0,
        Reason::RouteNotInIntent
    );
    assert_eq!(
        check(&p, &t, "GET", "api.openai.com", "/v1/organization/api_keys").0,
        Reason::RouteNotInIntent
    );
    assert_eq!(
        check(&p, &t, "POST", "api.anthropic.com", "/v1/messages").0,
        Reason::Allowed
    );
    assert_eq!(
        check(&p, &t, "POST", "api.anthropic.com", "/v1/messages/batches").0,
        Reason::RouteNotInIntent
    );
}

#[test]
fn quickstart_policy_decides_its_documented_example() {
    let p = example("example.yaml");
    let t = task(
        &p,
        "triage-bot",
        vec![
            grant("github.issues.read", &[("owner", "acme")]),
            grant("openai.chat", &[]),
        ],
    );
    assert_eq!(
        check(&p, &t, "GET", "api.github.com", "/repos/acme/web/issues").0,
        Reason::Allowed
    );
    assert_eq!(
        check(&p, &t, "GET", "api.github.com", "/repos/other/web/issues").0,
        Reason::ConstraintMismatch
    );
    let (reason, hint) = check(
        &p,
        &t,
        "POST",
        "api.github.com",
        "/repos/acme/web/issues/1/comments",
    );
    // The path is readable under github.issues.read; POSTing to it needs the comment capability.
    assert_eq!(reason, Reason::MethodNotAllowed);
    assert_eq!(hint.as_deref(), Some("github.issues.comment"));
    assert_eq!(
        check(&p, &t, "GET", "api.unknown.example", "/").0,
        Reason::UnknownHost
    );
}
