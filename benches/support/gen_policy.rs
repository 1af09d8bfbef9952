//! Benchmark policy generator: a valid keyward policy with N capabilities and M routes spread
//! over realistic REST APIs. Plain std, no keyward types, so the benches, `tests/bench_inputs.rs`
//! and `examples/gen_policy.rs` all include this one file (`#[path]`) and agree on its shape.
//!
//! Shape (deterministic; the same spec always gives the same text):
//! - `services` APIs `api.<vendor>.bench.example` (every 4th also serves
//!   `*.<vendor>-content.bench.example`), each with its own credential
//!   (`env:KW_BENCH_KEY_<i>`) injected as `Authorization: Bearer`. Three path styles rotate:
//!   `/repos/{owner}/{repo}/<res>` (GitHub-like), `/v2/orgs/{org}/projects/{project}/<res>`
//!   (org-scoped) and `/v1/<res>` (flat, LLM-like).
//! - Capabilities come in resource groups of three on one path prefix: `<vendor>.<res>.read`
//!   (GET, low), `.write` (POST/PATCH/PUT, medium), `.admin` (DELETE/PUT, high). Capability `k`
//!   belongs to service `k % services`. Routes are split evenly (the first `routes % caps`
//!   capabilities take one more), so the totals are exact.
//! - With a [`Harness`], two more services point at the benchmark origin (`https` on one
//!   port with `tls.ca_file`, `http` on another with `allow_cleartext`), both `connect_to`
//!   loopback, and the LAST two capabilities are theirs: `origin.bench.read` /
//!   `origin-http.bench.read`, whose first routes are `GET /v1/small` and `GET /v1/large`.
//!   Being last, they are the worst case for anything that scans a task's intent linearly.
//! - Agent `bench-agent` may hold every capability; `agent-<n>` hold every 7th from `n`.

#![allow(dead_code)]

use std::fmt::Write as _;

/// What to generate.
#[derive(Clone, Debug)]
pub struct Spec {
    pub capabilities: usize,
    pub routes: usize,
    pub services: usize,
    pub agents: usize,
    pub harness: Option<Harness>,
}

impl Spec {
    /// The "realistic large policy" of the performance targets: 1,000 capabilities, 10,000
    /// routes over 20 APIs (about 500 routes per host).
    pub fn large() -> Spec {
        Spec {
            capabilities: 1000,
            routes: 10_000,
            services: 20,
            agents: 20,
            harness: None,
        }
    }

    /// A small policy: 4 capabilities, 10 routes, 2 APIs.
    pub fn small() -> Spec {
        Spec {
            capabilities: 4,
            routes: 10,
            services: 2,
            agents: 2,
            harness: None,
        }
    }
}

/// Settings for a policy that `keyward serve` runs in the shared benchmark harness.
#[derive(Clone, Debug)]
pub struct Harness {
    pub proxy_listen: String,
    pub admin_listen: String,
    pub ca_cert: String,
    pub ca_key: String,
    pub audit: String,
    pub origin_host: String,
    pub origin_https_port: u16,
    pub origin_http_port: u16,
    pub origin_ca: String,
    pub passthrough: Vec<String>,
}

/// One generated capability, for callers that need to build requests against it.
#[derive(Clone, Debug)]
pub struct GenCapability {
    pub name: String,
    pub service: usize,
    /// First host of its service (exact).
    pub host: String,
    pub scheme: &'static str,
    pub port: u16,
    pub risk: &'static str,
    /// `METHODS /path` as written in the policy.
    pub routes: Vec<String>,
}

/// The policy text and what it contains.
#[derive(Clone, Debug)]
pub struct Generated {
    pub yaml: String,
    pub capabilities: Vec<GenCapability>,
    pub agents: Vec<String>,
    pub route_count: usize,
    /// `env:` variable of each credential, in service order.
    pub credential_envs: Vec<String>,
}

impl Generated {
    pub fn capability(&self, name: &str) -> Option<&GenCapability> {
        self.capabilities.iter().find(|c| c.name == name)
    }
}

const VENDORS: [&str; 24] = [
    "forge",
    "tracker",
    "ci",
    "registry",
    "llm",
    "search",
    "storage",
    "mail",
    "chat",
    "billing",
    "crm",
    "docs",
    "deploy",
    "metrics",
    "logs",
    "secrets",
    "queue",
    "cdn",
    "dns",
    "auth",
    "pager",
    "wiki",
    "design",
    "analytics",
];

const RESOURCES: [&str; 40] = [
    "issues",
    "pulls",
    "releases",
    "deployments",
    "hooks",
    "environments",
    "milestones",
    "branches",
    "commits",
    "tags",
    "artifacts",
    "runs",
    "jobs",
    "packages",
    "invitations",
    "members",
    "teams",
    "projects",
    "boards",
    "cards",
    "pipelines",
    "builds",
    "checks",
    "statuses",
    "secrets",
    "variables",
    "runners",
    "caches",
    "alerts",
    "advisories",
    "comments",
    "discussions",
    "gists",
    "keys",
    "labels",
    "models",
    "files",
    "vectors",
    "batches",
    "threads",
];

const SUBRESOURCES: [&str; 20] = [
    "comments",
    "events",
    "labels",
    "reviews",
    "attachments",
    "history",
    "assignees",
    "reactions",
    "timeline",
    "votes",
    "links",
    "checks",
    "logs",
    "notes",
    "owners",
    "tags",
    "versions",
    "permissions",
    "metadata",
    "subscriptions",
];

/// Path prefix of a resource for service `s` (three styles rotate).
fn prefix(s: usize, res: &str) -> String {
    match s % 3 {
        0 => format!("/repos/{{owner}}/{{repo}}/{res}"),
        1 => format!("/v2/orgs/{{org}}/projects/{{project}}/{res}"),
        _ => format!("/v1/{res}"),
    }
}

fn subresource(i: usize) -> String {
    let base = SUBRESOURCES[i % SUBRESOURCES.len()];
    match i / SUBRESOURCES.len() {
        0 => base.to_string(),
        n => format!("{base}-{n}"),
    }
}

/// Route `r` of a capability of `kind` (0 read, 1 write, 2 admin) on prefix `p`.
fn route(kind: usize, r: usize, p: &str) -> String {
    match (kind, r) {
        (0, 0) => format!("GET {p}"),
        (0, 1) => format!("GET {p}/{{id}}"),
        (0, 2) => format!("GET|HEAD {p}/{{id}}/files/{{*path}}"),
        (0, r) => {
            let s = subresource((r - 3) / 2);
            if (r - 3) % 2 == 0 {
                format!("GET {p}/{{id}}/{s}")
            } else {
                format!("GET {p}/{{id}}/{s}/{{child_id}}")
            }
        }
        (1, 0) => format!("POST {p}"),
        (1, 1) => format!("PATCH {p}/{{id}}"),
        (1, r) => {
            let s = subresource((r - 2) / 2);
            if (r - 2) % 2 == 0 {
                format!("POST {p}/{{id}}/{s}")
            } else {
                format!("PATCH|PUT {p}/{{id}}/{s}/{{child_id}}")
            }
        }
        (_, 0) => format!("DELETE {p}/{{id}}"),
        (_, 1) => format!("PUT|DELETE {p}/{{id}}/lock"),
        (_, r) => format!("DELETE {p}/{{id}}/{}/{{child_id}}", subresource(r - 2)),
    }
}

fn vendor(s: usize) -> String {
    let base = VENDORS[s % VENDORS.len()];
    match s / VENDORS.len() {
        0 => base.to_string(),
        n => format!("{base}{n}"),
    }
}

fn resource(group: usize) -> String {
    let base = RESOURCES[group % RESOURCES.len()];
    match group / RESOURCES.len() {
        0 => base.to_string(),
        n => format!("{base}-v{}", n + 1),
    }
}

/// Generates the policy. Panics only on a nonsensical spec (zero capabilities or services, or
/// fewer routes than capabilities): this is a benchmark tool.
pub fn generate(spec: &Spec) -> Generated {
    assert!(spec.capabilities >= 1 && spec.services >= 1 && spec.routes >= spec.capabilities);
    let origin_caps = if spec.harness.is_some() { 2 } else { 0 };
    assert!(
        spec.capabilities > origin_caps,
        "need more capabilities than the origin's two"
    );
    let generic = spec.capabilities - origin_caps;

    let mut y = String::with_capacity(spec.routes * 64 + 4096);
    y.push_str("# generated by benches/support/gen_policy.rs — do not edit\n");
    match &spec.harness {
        Some(h) => {
            let _ = writeln!(
                y,
                "proxy:\n  listen: {}\n  max_connections: 16384",
                h.proxy_listen
            );
            let _ = writeln!(
                y,
                "admin:\n  listen: {}\n  token: env:KEYWARD_ADMIN_TOKEN",
                h.admin_listen
            );
            let _ = writeln!(y, "ca:\n  cert: {}\n  key: {}", h.ca_cert, h.ca_key);
            let _ = writeln!(y, "audit:\n  path: {}", h.audit);
        }
        None => y.push_str("admin:\n  token: env:KEYWARD_ADMIN_TOKEN\n"),
    }

    // Services and their credentials.
    struct Svc {
        name: String,
        host: String,
        scheme: &'static str,
        port: u16,
    }
    let mut services: Vec<Svc> = Vec::new();
    let mut credential_envs = Vec::new();
    y.push_str("credentials:\n");
    let total_services = spec.services + origin_caps;
    for s in 0..total_services {
        let env = format!("KW_BENCH_KEY_{s}");
        let _ = writeln!(y, "  key_{s}: {{ source: env:{env} }}");
        credential_envs.push(env);
    }
    y.push_str("services:\n");
    for s in 0..spec.services {
        let v = vendor(s);
        let host = format!("api.{v}.bench.example");
        let _ = writeln!(y, "  {v}:");
        if s % 4 == 3 {
            let _ = writeln!(y, "    hosts: [{host}, \"*.{v}-content.bench.example\"]");
        } else {
            let _ = writeln!(y, "    hosts: [{host}]");
        }
        let _ = writeln!(
            y,
            "    inject: {{ header: Authorization, value: \"Bearer ${{credential}}\", credential: key_{s} }}"
        );
        services.push(Svc {
            name: v,
            host,
            scheme: "https",
            port: 443,
        });
    }
    if let Some(h) = &spec.harness {
        let (https, http) = (spec.services, spec.services + 1);
        let _ = writeln!(
            y,
            "  origin:\n    hosts: [{host}]\n    port: {port}\n    connect_to: 127.0.0.1:{port}\n    tls: {{ ca_file: {ca} }}\n    inject: {{ header: Authorization, value: \"Bearer ${{credential}}\", credential: key_{https} }}",
            host = h.origin_host,
            port = h.origin_https_port,
            ca = h.origin_ca,
        );
        let _ = writeln!(
            y,
            "  origin-http:\n    hosts: [{host}]\n    scheme: http\n    port: {port}\n    connect_to: 127.0.0.1:{port}\n    allow_cleartext: true\n    inject: {{ header: Authorization, value: \"Bearer ${{credential}}\", credential: key_{http} }}",
            host = h.origin_host,
            port = h.origin_http_port,
        );
        services.push(Svc {
            name: "origin".into(),
            host: h.origin_host.clone(),
            scheme: "https",
            port: h.origin_https_port,
        });
        services.push(Svc {
            name: "origin-http".into(),
            host: h.origin_host.clone(),
            scheme: "http",
            port: h.origin_http_port,
        });
    }

    // Capabilities.
    let per_cap = spec.routes / spec.capabilities;
    let extra = spec.routes % spec.capabilities;
    let mut caps = Vec::with_capacity(spec.capabilities);
    let mut route_count = 0;
    y.push_str("capabilities:\n");
    for k in 0..spec.capabilities {
        let n_routes = per_cap + usize::from(k < extra);
        let (service, name, risk, routes) = if k < generic {
            let s = k % spec.services;
            let j = k / spec.services;
            let (group, kind) = (j / 3, j % 3);
            let res = resource(group);
            let p = prefix(s, &res);
            let (kind_name, risk) = match kind {
                0 => ("read", "low"),
                1 => ("write", "medium"),
                _ => ("admin", "high"),
            };
            let routes: Vec<String> = (0..n_routes).map(|r| route(kind, r, &p)).collect();
            (s, format!("{}.{res}.{kind_name}", vendor(s)), risk, routes)
        } else {
            let s = spec.services + (k - generic);
            let name = format!("{}.bench.read", services[s].name);
            let mut routes = vec!["GET /v1/small".to_string(), "GET /v1/large".to_string()];
            let p = prefix(2, "models");
            routes.extend((0..n_routes.saturating_sub(2)).map(|r| route(0, r, &p)));
            routes.truncate(n_routes);
            (s, name, "low", routes)
        };
        let _ = writeln!(
            y,
            "  {name}:\n    service: {}\n    risk: {risk}\n    routes:",
            services[service].name
        );
        for r in &routes {
            let _ = writeln!(y, "      - \"{r}\"");
        }
        route_count += routes.len();
        caps.push(GenCapability {
            name,
            service,
            host: services[service].host.clone(),
            scheme: services[service].scheme,
            port: services[service].port,
            risk,
            routes,
        });
    }

    // Agents.
    let mut agents = vec!["bench-agent".to_string()];
    y.push_str("agents:\n  bench-agent:\n    owner: bench\n    max_ttl: 24h\n    capabilities:\n");
    for c in &caps {
        let _ = writeln!(y, "      - {}", c.name);
    }
    for n in 0..spec.agents {
        let name = format!("agent-{n}");
        let _ = writeln!(
            y,
            "  {name}:\n    owner: team-{}\n    max_ttl: 24h\n    capabilities:",
            n % 5
        );
        for c in caps.iter().skip(n % 7).step_by(7) {
            let _ = writeln!(y, "      - {}", c.name);
        }
        // Every agent may read the origin, so the extra harness tasks are realistic too.
        for c in caps.iter().skip(generic) {
            if caps.iter().skip(n % 7).step_by(7).all(|d| d.name != c.name) {
                let _ = writeln!(y, "      - {}", c.name);
            }
        }
        agents.push(name);
    }

    y.push_str("passthrough: [registry.npmjs.org, \"*.pythonhosted.org\"");
    if let Some(h) = &spec.harness {
        for p in &h.passthrough {
            let _ = write!(y, ", \"{p}\"");
        }
    }
    y.push_str("]\n");

    Generated {
        yaml: y,
        capabilities: caps,
        agents,
        route_count,
        credential_envs,
    }
}

/// A concrete request path for a route's path: `{owner}`→`acme`, `{repo}`→`web`,
/// `{org}`→`acme`, `{project}`→`web`, `{id}`→`42`, `{child_id}`→`7`, `{*path}`→`src/main.rs`.
pub fn concrete_path(route: &str) -> String {
    let path = route.split_once(' ').map_or(route, |(_, p)| p);
    path.split('/')
        .map(|seg| match seg {
            "{owner}" | "{org}" => "acme",
            "{repo}" | "{project}" => "web",
            "{id}" => "42",
            "{child_id}" => "7",
            "{*path}" => "src/main.rs",
            other => other,
        })
        .collect::<Vec<_>>()
        .join("/")
}
