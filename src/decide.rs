//! The decision: a pure function of (compiled policy, task, request facts, now).
//!
//! No I/O, no async, no clock, no metrics: the same function serves the proxy, `keyward explain`,
//! the benches and the fuzz targets. Only this module can construct a `Permit`, and credentials
//! are only injected into a request that holds one.

use std::time::SystemTime;

use http::Method;
use smallvec::SmallVec;

use crate::matcher::canon::CanonPath;
use crate::matcher::route::{RouteMatch, RoutePattern};
use crate::policy::{CompiledPolicy, RouteRef, Scheme};
use crate::reason::Reason;
use crate::tasks::{Grant, Task};

/// What the decision needs to know about a request. Host is normalized (see `normalize_host`).
#[derive(Clone, Copy, Debug)]
pub struct RequestFacts<'a> {
    pub scheme: Scheme,
    pub host: &'a str,
    pub port: u16,
    pub method: &'a Method,
    pub path: &'a CanonPath,
}

/// Proof that a request was allowed, and by what. Constructed only by `decide`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permit {
    service: usize,
    capability: usize,
    route: usize,
}

impl Permit {
    pub fn service(&self) -> usize {
        self.service
    }
    pub fn capability(&self) -> usize {
        self.capability
    }
    pub fn route(&self) -> usize {
        self.route
    }
}

/// A refusal, with what the audit record and the agent should learn from it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Denial {
    pub reason: Reason,
    /// The service of the host, when the host is configured.
    pub service: Option<usize>,
    /// The capability (and route) of the intent that came closest, for the audit record.
    pub capability: Option<usize>,
    pub route: Option<usize>,
    /// A capability that would have allowed the request, for the agent to ask for.
    pub hint: Option<usize>,
}

impl Denial {
    pub fn bare(reason: Reason) -> Denial {
        Denial {
            reason,
            service: None,
            capability: None,
            route: None,
            hint: None,
        }
    }
}

/// The outcome of a CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectDecision {
    /// Terminate TLS with a leaf for the host and decide each request inside; `service` is
    /// the host's, when it belongs to one service only.
    Intercept { service: Option<usize> },
    /// Tunnel blind (a `passthrough` host).
    Tunnel,
}

/// Whether the task may act at all at `now`.
pub fn check_validity(task: &Task, now: SystemTime) -> Result<(), Denial> {
    if task.is_revoked() {
        return Err(Denial::bare(Reason::TaskRevoked));
    }
    if task.is_expired(now) {
        return Err(Denial::bare(Reason::TaskExpired));
    }
    Ok(())
}

/// Decides one request. `Ok` means forward with the permit's credential; the caller still
/// charges the task's budget (only allowed requests count).
pub fn decide(
    policy: &CompiledPolicy,
    task: &Task,
    facts: &RequestFacts<'_>,
    now: SystemTime,
) -> Result<Permit, Denial> {
    check_validity(task, now)?;
    let table = policy
        .host_table(facts.scheme, facts.host, facts.port)
        .ok_or(Denial::bare(Reason::UnknownHost))?;

    // Inline room for the usual handful of matching routes: no allocation per request.
    let mut matches: SmallVec<[RouteMatch<'_, RouteRef>; 8]> = SmallVec::new();
    table.router.find(facts.path, &mut matches);

    let agent = policy.agent_grants(&task.agent);
    let mut best = Denial::bare(Reason::RouteNotInIntent);
    best.service = table.sole_service;

    for m in &matches {
        let ci = m.value.capability as usize;
        let ri = m.value.route as usize;
        let cap = policy.capability_at(ci);
        let route = &cap.routes[ri];
        let method_ok = route.methods.iter().any(|x| x == facts.method);
        // SECURITY: a grant counts only while the agent still holds the capability (reloads).
        let held = agent.is_some_and(|a| a.contains(ci));
        let grant = held.then(|| task.grant(&cap.name)).flatten();
        let Some(grant) = grant else {
            // Suggest only what this agent could be given: a task for it can be minted.
            if method_ok && held {
                best.hint = better_hint(policy, best.hint, ci);
            }
            continue;
        };
        let candidate = |reason| Denial {
            reason,
            service: Some(cap.service),
            capability: Some(ci),
            route: Some(ri),
            hint: best.hint,
        };
        if !method_ok {
            best = closer(best, candidate(Reason::MethodNotAllowed));
            continue;
        }
        if !constraints_hold(grant, route, m, facts.path) {
            best = closer(best, candidate(Reason::ConstraintMismatch));
            continue;
        }
        if cap.risk.needs_approval() {
            // Approvals do not exist yet: high-risk capabilities always need one.
            best = closer(best, candidate(Reason::ApprovalRequired));
            continue;
        }
        return Ok(Permit {
            service: cap.service,
            capability: ci,
            route: ri,
        });
    }
    Err(best)
}

/// Decides a CONNECT by host alone: intercept when a capability of the intent serves the host.
pub fn decide_connect(
    policy: &CompiledPolicy,
    task: &Task,
    host: &str,
    port: u16,
    now: SystemTime,
) -> Result<ConnectDecision, Denial> {
    check_validity(task, now)?;
    if let Some(table) = policy.host_table(Scheme::Https, host, port) {
        let agent = policy.agent_grants(&task.agent);
        let mut hint = None;
        for &ci in &table.capabilities {
            let ci = ci as usize;
            let cap = policy.capability_at(ci);
            let held = agent.is_some_and(|a| a.contains(ci));
            if held && task.grant(&cap.name).is_some() {
                return open_unless_spent(
                    task,
                    ConnectDecision::Intercept {
                        service: table.sole_service,
                    },
                );
            }
            if held {
                hint = better_hint(policy, hint, ci);
            }
        }
        return Err(Denial {
            reason: Reason::RouteNotInIntent,
            service: table.sole_service,
            capability: None,
            route: None,
            hint,
        });
    }
    if policy.is_passthrough(host) {
        return open_unless_spent(task, ConnectDecision::Tunnel);
    }
    Err(Denial::bare(Reason::UnknownHost))
}

/// The capability to suggest of `hint` (the first found) and `ci`: the first, unless only `ci`
/// could be used without an approval (a task that includes it would be allowed now).
fn better_hint(policy: &CompiledPolicy, hint: Option<usize>, ci: usize) -> Option<usize> {
    match hint {
        Some(h)
            if !policy.capability_at(h).risk.needs_approval()
                || policy.capability_at(ci).risk.needs_approval() =>
        {
            Some(h)
        }
        _ => Some(ci),
    }
}

/// A task whose request budget is spent could send nothing through a tunnel (a blind one
/// costs one request, taken when it is dialled): refused before a leaf is issued or anything
/// dialled.
fn open_unless_spent(task: &Task, open: ConnectDecision) -> Result<ConnectDecision, Denial> {
    match task.budget_spent() {
        true => Err(Denial::bare(Reason::BudgetExhausted)),
        false => Ok(open),
    }
}

/// Every constraint of the grant must be satisfied by this route's captured parameters. A route
/// without the constrained parameter cannot prove the constraint, so it fails (fail closed).
fn constraints_hold(
    grant: &Grant,
    route: &RoutePattern,
    m: &RouteMatch<'_, RouteRef>,
    path: &CanonPath,
) -> bool {
    grant.constraints.iter().all(|(name, allowed)| {
        let Some(k) = route.param_names().position(|p| p == name) else {
            return false;
        };
        let Some(value) = m.captures.value(k, path) else {
            return false;
        };
        allowed.iter().any(|a| a == value)
    })
}

/// Of two denials, the one that came closer to being allowed (the agent learns the most from it).
fn closer(a: Denial, b: Denial) -> Denial {
    fn rank(r: Reason) -> u8 {
        match r {
            Reason::ApprovalRequired => 4,
            Reason::ConstraintMismatch => 3,
            Reason::MethodNotAllowed => 2,
            _ => 1,
        }
    }
    if rank(b.reason) > rank(a.reason) {
        Denial { hint: a.hint, ..b }
    } else {
        a
    }
}

/// Normalizes a request host for lookup: lowercase, one trailing dot removed, IPv6 brackets
/// removed, IP literals in their canonical text. `None` for anything that is not a plausible
/// host name or IP literal (refused as ambiguous by the caller).
pub fn normalize_host(raw: &str) -> Option<String> {
    let unbracketed = raw
        .strip_prefix('[')
        .and_then(|r| r.strip_suffix(']'))
        .map(|v6| (v6, true))
        .unwrap_or((raw, false));
    if unbracketed.1 {
        let ip: std::net::Ipv6Addr = unbracketed.0.parse().ok()?;
        return Some(ip.to_string());
    }
    let host = raw.strip_suffix('.').unwrap_or(raw);
    if host.is_empty() || host.len() > 253 {
        return None;
    }
    if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
        return Some(ip.to_string());
    }
    // RFC 1123 labels (no `-` at either end: no certificate can name one, so a CONNECT to one
    // would be answered 200 and then fail its handshake); `_` as service names use it.
    let ok = host.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    ok.then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matcher::canon::canonicalize;
    use crate::policy::testing::{ok, ADMIN};
    use crate::tasks::{Grant, MintSpec, TaskStore};

    /// Two capabilities that allow `DELETE /things/{id}`, one of them high-risk; the agent
    /// holds both (and a third), the task only the third.
    fn policy(high_first: bool) -> CompiledPolicy {
        let (first, second) = match high_first {
            true => ("high", "low"),
            false => ("low", "high"),
        };
        let text = format!(
            "{ADMIN}
credentials:
  k: {{ source: env:K }}
services:
  api:
    hosts: [api.test]
    inject: {{ header: x-key, value: \"${{credential}}\", credential: k }}
capabilities:
  a.first:
    service: api
    risk: {first}
    routes: [DELETE /things/{{id}}]
  b.second:
    service: api
    risk: {second}
    routes: [DELETE /things/{{id}}]
  c.read:
    service: api
    routes: [GET /other]
agents:
  bot:
    owner: t
    capabilities: [a.first, b.second, c.read]
    max_ttl: 1h
"
        );
        CompiledPolicy::compile(ok(&text))
    }

    fn hint_for_delete(policy: &CompiledPolicy) -> String {
        let spec = MintSpec {
            agent: "bot".into(),
            task: None,
            intent: vec![Grant {
                capability: "c.read".into(),
                constraints: Default::default(),
            }],
            ttl: None,
            max_requests: None,
        };
        let now = SystemTime::now();
        let (task, _) = TaskStore::new().mint(policy, spec, now).unwrap();
        let path = canonicalize("/things/1").unwrap();
        let facts = RequestFacts {
            scheme: Scheme::Https,
            host: "api.test",
            port: 443,
            method: &http::Method::DELETE,
            path: &path,
        };
        let denial = decide(policy, &task, &facts, now).unwrap_err();
        assert_eq!(denial.reason, Reason::RouteNotInIntent);
        policy.capability_at(denial.hint.unwrap()).name.clone()
    }

    // The suggestion is one a new task could use: a capability that needs an approval is
    // named only when no other would allow the request.
    #[test]
    fn the_hint_prefers_a_capability_that_needs_no_approval() {
        for high_first in [true, false] {
            let p = policy(high_first);
            let want = if high_first { "b.second" } else { "a.first" };
            assert_eq!(hint_for_delete(&p), want, "high first: {high_first}");
        }
    }
}
