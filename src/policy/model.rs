//! The validated policy: plain data, references already resolved to indices.
//!
//! Owns the shapes the rest of keyward reads (`Policy`, `ServiceDef`, `CapabilityDef`, ...).
//! Every value here has passed `check`, so consumers never re-validate. This module must never
//! parse YAML, touch the file system, or hold a secret's value: `SecretSource` says where a
//! secret lives, not what it is.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::matcher::route::RoutePattern;

/// A validated policy. Names are unique within each list; cross references are indices into the
/// lists of this same `Policy` (e.g. `CapabilityDef::service` indexes `services`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// First 16 hex chars of sha256 over the file's bytes; stamped on audit records.
    pub version: String,
    pub proxy: ProxySettings,
    pub admin: AdminSettings,
    pub ca: CaSettings,
    pub audit: AuditSettings,
    pub credentials: Vec<CredentialDef>,
    pub services: Vec<ServiceDef>,
    pub capabilities: Vec<CapabilityDef>,
    pub agents: Vec<AgentDef>,
    pub passthrough: Vec<HostPattern>,
}

impl Policy {
    /// What is valid but probably not what the author meant; `check` prints these and `serve`
    /// logs them.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, service) in self.services.iter().enumerate() {
            if !self.capabilities.iter().any(|c| c.service == i) {
                out.push(format!(
                    "service `{}` has no capability: no request can reach it",
                    service.name
                ));
            }
        }
        for (i, credential) in self.credentials.iter().enumerate() {
            let used = self
                .services
                .iter()
                .any(|s| s.inject.as_ref().is_some_and(|inj| inj.credential() == i));
            if !used {
                out.push(format!(
                    "credential `{}` is injected by no service",
                    credential.name
                ));
            }
        }
        for (i, cap) in self.capabilities.iter().enumerate() {
            let granted = self.agents.iter().any(|a| a.capabilities.contains(&i));
            if granted && cap.risk.needs_approval() {
                out.push(format!(
                    "capability `{}` is {}-risk: every request for it is denied `approval_required` (approvals do not exist yet)",
                    cap.name,
                    cap.risk.as_str()
                ));
            }
        }
        out.iter()
            .map(|w| super::error::hide_pasted("", w).1)
            .collect()
    }

    pub fn credential_index(&self, name: &str) -> Option<usize> {
        self.credentials.iter().position(|c| c.name == name)
    }
    pub fn service_index(&self, name: &str) -> Option<usize> {
        self.services.iter().position(|s| s.name == name)
    }
    pub fn capability_index(&self, name: &str) -> Option<usize> {
        self.capabilities.iter().position(|c| c.name == name)
    }
    pub fn agent_index(&self, name: &str) -> Option<usize> {
        self.agents.iter().position(|a| a.name == name)
    }
}

/// The agent-facing listener and its limits (YAML `proxy:`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    /// How long an agent may take none of the bytes keyward has for it (a full socket buffer)
    /// before its connection is closed: an agent that stops reading must not hold a
    /// connection, an upstream connection and a place in flight for ever.
    pub send_timeout: Duration,
    pub max_connections: usize,
    /// Requests one task may have in flight at once, so one task cannot starve the others.
    pub max_task_in_flight: u32,
    /// Denials of one task answered per second before the rest wait (see
    /// `Task::pace_denial`): each writes an audit record, and a refusal loop must not fill
    /// the audit log's disk.
    pub max_task_denials_per_second: u32,
    /// Connections (and the tunnels they became) one task may hold at once, when set; see
    /// `task_connections_limit`.
    pub max_task_connections: Option<u32>,
    /// The same for all the tasks of one agent together, when set; see
    /// `agent_connections_limit`.
    pub max_agent_connections: Option<u32>,
    pub max_header_bytes: usize,
    pub connect_timeout: Duration,
    /// Time allowed until the upstream's response head arrives (bodies may stream longer).
    pub upstream_timeout: Duration,
    /// How long `SIGTERM`/`SIGINT` lets requests, tunnels and relays in flight finish, on both
    /// listeners, before cutting them.
    pub shutdown_timeout: Duration,
}

impl ProxySettings {
    /// How large a head the HTTP parser reads (its buffer, HTTP/2's header list): over
    /// `max_header_bytes` by 16 KiB, so that a head somewhat over the limit reaches keyward,
    /// which answers it with its own 431 problem and record (`head_too_large`) instead of the
    /// parser's bare one. hyper needs at least 8 KiB.
    pub fn parser_head_limit(&self) -> usize {
        self.max_header_bytes.saturating_add(16 * 1024).max(8192)
    }

    /// Connections one task may hold: `max_task_connections`, by default a quarter of
    /// `max_connections`, so one task cannot take every place from the others.
    pub fn task_connections_limit(&self) -> u32 {
        self.max_task_connections.unwrap_or_else(|| {
            u32::try_from(self.max_connections / 4)
                .unwrap_or(u32::MAX)
                .max(1)
        })
    }

    /// Connections all the tasks of one agent may hold together: `max_agent_connections`, by
    /// default half of `max_connections`, so one agent's tasks (a quarter each) cannot take
    /// every place from the other agents.
    pub fn agent_connections_limit(&self) -> u32 {
        self.max_agent_connections.unwrap_or_else(|| {
            u32::try_from(self.max_connections / 2)
                .unwrap_or(u32::MAX)
                .max(1)
        })
    }
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8480)),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(90),
            send_timeout: Duration::from_secs(60),
            max_connections: 4096,
            max_task_in_flight: 64,
            max_task_denials_per_second: 50,
            max_task_connections: None,
            max_agent_connections: None,
            max_header_bytes: 65536,
            connect_timeout: Duration::from_secs(10),
            upstream_timeout: Duration::from_secs(300),
            shutdown_timeout: Duration::from_secs(10),
        }
    }
}

/// The admin listener (YAML `admin:`). The token has no default: an admin API without one
/// would let anyone on the host mint tasks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    pub listen: SocketAddr,
    pub token: SecretSource,
    /// Tasks keyward holds at once (live ones, and ended ones kept an hour for listing): a
    /// minting loop must not grow memory without end.
    pub max_tasks: usize,
}

impl AdminSettings {
    pub const DEFAULT_MAX_TASKS: usize = 100_000;
}

/// Where the CA certificate and key live (resolved against the policy file's directory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaSettings {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditSettings {
    pub path: AuditTarget,
}

/// `audit.path`: `-` is standard output, anything else a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Stdout,
    File(PathBuf),
}

/// Where a secret is read from. Never the secret itself: literal secrets are refused at load.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// `env:NAME`
    Env(String),
    /// `file:PATH`, resolved against the policy file's directory.
    File(PathBuf),
    /// `{exec: [argv...]}`: the command's standard output (trimmed) is the secret.
    Exec { argv: Vec<String> },
}

// SECURITY: an operator may paste a token into an exec argument (`curl -H "...: tok"`); Debug
// output (logs, panics) shows only the program name and argument count.
impl fmt::Debug for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(name) => f.debug_tuple("Env").field(name).finish(),
            SecretSource::File(path) => f.debug_tuple("File").field(path).finish(),
            SecretSource::Exec { argv } => f
                .debug_struct("Exec")
                .field("program", &argv.first())
                .field("args", &argv.len().saturating_sub(1))
                .finish(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialDef {
    pub name: String,
    pub source: SecretSource,
    /// How often an `exec` source is re-run (default 5m); `None` for `env` and `file`.
    pub refresh: Option<Duration>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

/// A host a service answers for: lowercased, no trailing dot, IPv6 without brackets.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HostPattern {
    /// A DNS name or an IP literal.
    Exact(String),
    /// `*.example.com` stored as `example.com`: matches exactly one extra label.
    Wildcard(String),
}

impl HostPattern {
    /// Whether `host` (as it came from a CONNECT authority or absolute URI) is covered. Case,
    /// one trailing dot and IPv6 brackets are ignored; nothing else is normalized.
    pub fn matches(&self, host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        match self {
            HostPattern::Exact(name) => host.eq_ignore_ascii_case(name),
            HostPattern::Wildcard(base) => {
                // SECURITY: exactly one label in front, so `*.example.com` never covers
                // `a.b.example.com` nor `example.com` itself.
                let Some(split) = host.len().checked_sub(base.len() + 1) else {
                    return false;
                };
                // Bytes, not str: a split inside a multi-byte char must not panic.
                let (label, rest) = host.as_bytes().split_at(split);
                rest.first() == Some(&b'.')
                    && rest[1..].eq_ignore_ascii_case(base.as_bytes())
                    && !label.is_empty()
                    && !label.contains(&b'.')
            }
        }
    }

    /// Whether some host name is matched by both patterns.
    pub fn shares_host_with(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (HostPattern::Exact(a), HostPattern::Exact(b)) => a == b,
            (HostPattern::Wildcard(a), HostPattern::Wildcard(b)) => a == b,
            (HostPattern::Wildcard(_), HostPattern::Exact(name))
            | (HostPattern::Exact(name), HostPattern::Wildcard(_)) => {
                let wildcard = if matches!(self, HostPattern::Wildcard(_)) {
                    self
                } else {
                    other
                };
                wildcard.matches(name)
            }
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Wildcard(base) => write!(f, "*.{base}"),
        }
    }
}

/// How a service's credential is put into a forwarded request. `credential` indexes
/// `Policy::credentials`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Injection {
    /// `header: NAME, value: "PREFIX${credential}SUFFIX"`.
    Header {
        name: http::HeaderName,
        prefix: String,
        suffix: String,
        credential: usize,
    },
    /// `query: PARAM`: the query parameter `PARAM` is set to the secret.
    Query { param: String, credential: usize },
    /// `basic: {username: USER}`: `Authorization: Basic base64(USER:secret)`.
    Basic { username: String, credential: usize },
}

impl Injection {
    pub fn credential(&self) -> usize {
        match self {
            Injection::Header { credential, .. }
            | Injection::Query { credential, .. }
            | Injection::Basic { credential, .. } => *credential,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceDef {
    pub name: String,
    pub hosts: Vec<HostPattern>,
    pub scheme: Scheme,
    pub port: u16,
    /// Dial this `(host, port)` instead of resolving the request's host (host without brackets).
    pub connect_to: Option<(String, u16)>,
    /// Extra root certificates for the upstream (`tls.ca_file`); system roots still apply.
    pub ca_file: Option<PathBuf>,
    pub inject: Option<Injection>,
    pub allow_cleartext: bool,
}

/// Risk tier of a capability; `high` and `critical` need an approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Risk {
    #[default]
    Low,
    Medium,
    High,
    Critical,
}

impl Risk {
    /// Requests under a capability of this tier need an approval (until approvals exist,
    /// they are always refused as `approval_required`).
    pub fn needs_approval(self) -> bool {
        matches!(self, Risk::High | Risk::Critical)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Risk::Low => "low",
            Risk::Medium => "medium",
            Risk::High => "high",
            Risk::Critical => "critical",
        }
    }
    pub fn parse(s: &str) -> Option<Risk> {
        match s {
            "low" => Some(Risk::Low),
            "medium" => Some(Risk::Medium),
            "high" => Some(Risk::High),
            "critical" => Some(Risk::Critical),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapabilityDef {
    pub name: String,
    /// Index into `Policy::services`.
    pub service: usize,
    pub risk: Risk,
    pub routes: Vec<RoutePattern>,
    /// Canonical text of each route (same order as `routes`) for the audit `route` field.
    pub route_text: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentDef {
    pub name: String,
    pub owner: String,
    /// Indices into `Policy::capabilities`: what this agent may ever be granted.
    pub capabilities: Vec<usize>,
    /// Longest task this agent may run (default 1h).
    pub max_ttl: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(s: &str) -> HostPattern {
        HostPattern::Exact(s.into())
    }
    fn wild(s: &str) -> HostPattern {
        HostPattern::Wildcard(s.into())
    }

    #[test]
    fn wildcard_matches_exactly_one_label() {
        let w = wild("example.com");
        assert!(w.matches("a.example.com"));
        assert!(w.matches("A.Example.COM."));
        assert!(!w.matches("example.com"));
        assert!(!w.matches(".example.com"));
        assert!(!w.matches("a.b.example.com"));
        assert!(!w.matches("aexample.com"));
        assert!(!w.matches("a.example.co"));
        assert!(!w.matches(""));
        assert!(!w.matches("\u{e9}xample.com"));
        assert!(!w.matches("\u{e9}.example.com\u{e9}"));
    }

    #[test]
    fn exact_matches_ignoring_case_dot_and_brackets() {
        assert!(exact("api.github.com").matches("API.github.com."));
        assert!(exact("::1").matches("[::1]"));
        assert!(!exact("api.github.com").matches("api.github.com.evil"));
    }

    #[test]
    fn shared_hosts() {
        assert!(exact("a.x.com").shares_host_with(&exact("a.x.com")));
        assert!(wild("x.com").shares_host_with(&exact("a.x.com")));
        assert!(exact("a.x.com").shares_host_with(&wild("x.com")));
        assert!(wild("x.com").shares_host_with(&wild("x.com")));
        assert!(!wild("x.com").shares_host_with(&wild("a.x.com")));
        assert!(!wild("x.com").shares_host_with(&exact("x.com")));
        assert!(!exact("a.x.com").shares_host_with(&exact("b.x.com")));
    }

    #[test]
    fn secret_source_debug_hides_exec_arguments() {
        let s = SecretSource::Exec {
            argv: vec!["curl".into(), "-H".into(), "X-Token: hunter2".into()],
        };
        let shown = format!("{s:?}");
        assert!(shown.contains("curl"));
        assert!(!shown.contains("hunter2"));
    }

    #[test]
    fn risk_round_trips() {
        for r in [Risk::Low, Risk::Medium, Risk::High, Risk::Critical] {
            assert_eq!(Risk::parse(r.as_str()), Some(r));
        }
        assert_eq!(Risk::default(), Risk::Low);
        assert_eq!(Risk::parse("LOW"), None);
    }
}
