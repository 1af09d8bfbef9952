//! Compiles a validated `Policy` into the lookup structures the hot path uses: per (scheme,
//! host, port) a route trie holding every route of every capability whose service serves that
//! host, plus name indexes. Built once per load; read-only afterwards (shared through `Arc`).

use std::collections::{HashMap, HashSet};

use foldhash::fast::RandomState;
use std::net::IpAddr;

use crate::matcher::route::Router;
use crate::policy::{AgentDef, CapabilityDef, HostPattern, Policy, Scheme, ServiceDef};

/// A route of a capability, as stored in a host's trie.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteRef {
    pub capability: u32,
    pub route: u32,
}

/// Everything keyward knows about one (scheme, host, port).
#[derive(Debug)]
pub struct HostTable {
    pub router: Router<RouteRef>,
    /// Capabilities with at least one route here (sorted, for CONNECT decisions).
    pub capabilities: Vec<u32>,
    /// The service of every capability here, when they all have the same one (services may
    /// share a host when their routes do not overlap; then a CONNECT names none).
    pub sole_service: Option<usize>,
    shared: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct HostKey {
    scheme: Scheme,
    host: Box<str>,
    port: u16,
}

/// Host tables by host name, then by (scheme, port): a lookup by `&str` allocates nothing (a
/// `HostKey` with a `Box<str>` would allocate per request). A host rarely has more than one
/// (scheme, port), so the inner list is searched linearly.
/// Keys come from the policy, never from a request, so the fast foldhash is safe here.
type HostTables = HashMap<Box<str>, Vec<(Scheme, u16, HostTable)>, RandomState>;

/// The capabilities an agent may ever be granted, as a bitset over capability indices, so
/// `decide` checks a match in O(1) whatever the size of the agent's list.
#[derive(Debug, Clone, Copy)]
pub struct AgentGrants<'p>(&'p [u64]);

impl AgentGrants<'_> {
    pub fn contains(&self, capability: usize) -> bool {
        self.0
            .get(capability / 64)
            .is_some_and(|w| w & (1u64 << (capability % 64)) != 0)
    }
}

/// The policy in the form `decide` reads.
#[derive(Debug)]
pub struct CompiledPolicy {
    policy: Policy,
    exact: HostTables,
    /// keyed by the parent domain of `*.parent`.
    wildcard: HostTables,
    passthrough_exact: HashSet<Box<str>>,
    passthrough_wildcard: HashSet<Box<str>>,
    /// IP-literal passthrough hosts: the operator named them, so they may be private.
    passthrough_addresses: Vec<IpAddr>,
    capability_index: HashMap<Box<str>, usize, RandomState>,
    agent_index: HashMap<Box<str>, usize, RandomState>,
    /// Per agent (same order as `Policy::agents`): `AgentDef::capabilities` as a bitset.
    agent_grants: Vec<Box<[u64]>>,
}

impl CompiledPolicy {
    pub fn compile(policy: Policy) -> CompiledPolicy {
        let mut exact: HashMap<HostKey, HostTable> = HashMap::new();
        let mut wildcard: HashMap<HostKey, HostTable> = HashMap::new();

        // Exact hosts also receive the routes of wildcard services that cover them, so one
        // lookup finds every route that could apply to that host.
        let exact_hosts: Vec<(HostKey, usize)> = policy
            .services
            .iter()
            .enumerate()
            .flat_map(|(si, s)| {
                s.hosts.iter().filter_map(move |h| match h {
                    HostPattern::Exact(name) => Some((key(s, name), si)),
                    HostPattern::Wildcard(_) => None,
                })
            })
            .collect();

        for (ci, cap) in policy.capabilities.iter().enumerate() {
            let service = &policy.services[cap.service];
            for host in &service.hosts {
                match host {
                    HostPattern::Exact(name) => add_routes(
                        exact.entry(key(service, name)).or_insert_with(empty),
                        ci,
                        cap,
                    ),
                    HostPattern::Wildcard(parent) => {
                        add_routes(
                            wildcard.entry(key(service, parent)).or_insert_with(empty),
                            ci,
                            cap,
                        );
                        for (k, _) in &exact_hosts {
                            if k.scheme == service.scheme
                                && k.port == service.port
                                && parent_of(&k.host) == Some(parent.as_str())
                            {
                                add_routes(exact.entry(k.clone()).or_insert_with(empty), ci, cap);
                            }
                        }
                    }
                }
            }
        }
        // A service host without capabilities is still a known host (CONNECT → route_not_in_intent).
        for (k, _) in exact_hosts {
            exact.entry(k).or_insert_with(empty);
        }
        for s in &policy.services {
            for h in &s.hosts {
                if let HostPattern::Wildcard(parent) = h {
                    wildcard.entry(key(s, parent)).or_insert_with(empty);
                }
            }
        }

        let mut passthrough_exact: HashSet<Box<str>> = HashSet::new();
        let mut passthrough_wildcard = HashSet::new();
        for p in &policy.passthrough {
            match p {
                HostPattern::Exact(h) => passthrough_exact.insert(h.as_str().into()),
                HostPattern::Wildcard(h) => passthrough_wildcard.insert(h.as_str().into()),
            };
        }
        let passthrough_addresses = passthrough_exact
            .iter()
            .filter_map(|h| h.parse::<IpAddr>().ok())
            .collect();
        let capability_index = policy
            .capabilities
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.as_str().into(), i))
            .collect();
        let agent_index = policy
            .agents
            .iter()
            .enumerate()
            .map(|(i, a)| (a.name.as_str().into(), i))
            .collect();
        let words = policy.capabilities.len().div_ceil(64);
        let agent_grants = policy
            .agents
            .iter()
            .map(|a| {
                let mut bits = vec![0u64; words];
                for &ci in &a.capabilities {
                    if let Some(w) = bits.get_mut(ci / 64) {
                        *w |= 1u64 << (ci % 64);
                    }
                }
                bits.into_boxed_slice()
            })
            .collect();
        CompiledPolicy {
            policy,
            exact: by_host(exact),
            wildcard: by_host(wildcard),
            passthrough_exact,
            passthrough_wildcard,
            passthrough_addresses,
            capability_index,
            agent_index,
            agent_grants,
        }
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    pub fn version(&self) -> &str {
        &self.policy.version
    }

    /// The table for a normalized host (lowercase, no trailing dot, IPv6 without brackets).
    pub fn host_table(&self, scheme: Scheme, host: &str, port: u16) -> Option<&HostTable> {
        if let Some(t) = find_table(&self.exact, scheme, host, port) {
            return Some(t);
        }
        find_table(&self.wildcard, scheme, parent_of(host)?, port)
    }

    /// Whether some service has `host` under any scheme and port (to tell an agent that
    /// reached a configured host on the wrong port why it was `unknown_host`).
    pub fn serves_host(&self, host: &str) -> bool {
        self.exact.contains_key(host)
            || parent_of(host).is_some_and(|p| self.wildcard.contains_key(p))
    }

    /// Whether CONNECTs to `host` (any port) are tunnelled blind.
    pub fn is_passthrough(&self, host: &str) -> bool {
        self.passthrough_exact.contains(host)
            || parent_of(host).is_some_and(|p| self.passthrough_wildcard.contains(p))
    }

    /// Passthrough hosts written as IP addresses.
    pub fn passthrough_addresses(&self) -> &[IpAddr] {
        &self.passthrough_addresses
    }

    pub fn agent(&self, name: &str) -> Option<&AgentDef> {
        self.agent_index.get(name).map(|&i| &self.policy.agents[i])
    }

    /// What the agent named `name` may ever be granted (`None`: no such agent).
    pub fn agent_grants(&self, name: &str) -> Option<AgentGrants<'_>> {
        let &i = self.agent_index.get(name)?;
        self.agent_grants.get(i).map(|b| AgentGrants(b))
    }

    pub fn capability(&self, name: &str) -> Option<(usize, &CapabilityDef)> {
        self.capability_index
            .get(name)
            .map(|&i| (i, &self.policy.capabilities[i]))
    }

    pub fn capability_at(&self, i: usize) -> &CapabilityDef {
        &self.policy.capabilities[i]
    }

    pub fn service_at(&self, i: usize) -> &ServiceDef {
        &self.policy.services[i]
    }

    /// Number of distinct routes compiled (for logs).
    pub fn route_count(&self) -> usize {
        self.policy
            .capabilities
            .iter()
            .map(|c| c.routes.len())
            .sum()
    }
}

fn find_table<'t>(
    tables: &'t HostTables,
    scheme: Scheme,
    host: &str,
    port: u16,
) -> Option<&'t HostTable> {
    tables
        .get(host)?
        .iter()
        .find(|(s, p, _)| *s == scheme && *p == port)
        .map(|(_, _, t)| t)
}

fn by_host(tables: HashMap<HostKey, HostTable>) -> HostTables {
    let mut out = HostTables::default();
    for (k, t) in tables {
        out.entry(k.host).or_default().push((k.scheme, k.port, t));
    }
    out
}

fn empty() -> HostTable {
    HostTable {
        router: Router::new(),
        capabilities: Vec::new(),
        sole_service: None,
        shared: false,
    }
}

fn key(service: &ServiceDef, host: &str) -> HostKey {
    HostKey {
        scheme: service.scheme,
        host: host.into(),
        port: service.port,
    }
}

fn add_routes(table: &mut HostTable, ci: usize, cap: &CapabilityDef) {
    for (ri, route) in cap.routes.iter().enumerate() {
        table.router.insert(
            route,
            RouteRef {
                capability: ci as u32,
                route: ri as u32,
            },
        );
    }
    if let Err(pos) = table.capabilities.binary_search(&(ci as u32)) {
        table.capabilities.insert(pos, ci as u32);
    }
    match table.sole_service {
        _ if table.shared => {}
        None => table.sole_service = Some(cap.service),
        Some(s) if s != cap.service => {
            table.sole_service = None;
            table.shared = true;
        }
        Some(_) => {}
    }
}

/// "a.example.com" → "example.com"; a single label or an IP literal has no parent.
fn parent_of(host: &str) -> Option<&str> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    let (_, parent) = host.split_once('.')?;
    (!parent.is_empty()).then_some(parent)
}
