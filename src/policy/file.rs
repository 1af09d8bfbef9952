//! Stage one of loading: walk the YAML tree into a raw mirror of the policy (`RawPolicy`),
//! reporting every shape problem — unknown keys, wrong types, missing keys, values that do not
//! parse — with its position. Names are kept as written (with positions) for `check` to resolve.
//!
//! Must never resolve references or compare entries with each other (that is `check`), and
//! never put a value into a message: `credentials.*.source` and `admin.token` least of all.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use marked_yaml::Node;

use super::error::{Errors, Pos};
use super::model::{
    AdminSettings, AuditSettings, AuditTarget, CaSettings, HostPattern, ProxySettings, Risk,
    SecretSource,
};
use super::service::{host_list, read_service, RawService};
use super::values;
use super::yaml::{Field, Located, Map};
use crate::matcher::route::RoutePattern;

const MS: Duration = Duration::from_millis(1);
const DAY: Duration = Duration::from_secs(24 * 3600);
const DEFAULT_EXEC_REFRESH: Duration = Duration::from_secs(300);
const DEFAULT_MAX_TTL: Duration = Duration::from_secs(3600);
const LITERAL_SECRET: &str =
    "literal secrets are not allowed; write `env:NAME`, `file:PATH` or `{exec: [command, args...]}`";

pub(crate) struct RawPolicy {
    pub proxy: ProxySettings,
    /// `None` when `admin` or its token is missing or invalid (already reported).
    pub admin: Option<AdminSettings>,
    pub ca: CaSettings,
    pub audit: AuditSettings,
    pub credentials: Vec<RawCredential>,
    pub services: Vec<RawService>,
    pub capabilities: Vec<RawCapability>,
    pub agents: Vec<RawAgent>,
    pub passthrough: Vec<Located<HostPattern>>,
}

pub(crate) struct RawCredential {
    pub name: Located<String>,
    /// `None` when the source was invalid (already reported).
    pub source: Option<(SecretSource, Option<Duration>)>,
}

pub(crate) struct RawCapability {
    pub name: Located<String>,
    pub service: Option<Located<String>>,
    pub risk: Risk,
    pub routes: Vec<Located<RoutePattern>>,
}

pub(crate) struct RawAgent {
    pub name: Located<String>,
    pub owner: Option<String>,
    pub capabilities: Vec<Located<String>>,
    pub max_ttl: Duration,
}

/// Walks the whole tree; every problem goes to `errs`, and the mirror holds whatever was valid.
/// `policy_file` is the file being read (what `audit.path` must not name).
pub(crate) fn read(
    root: &Node,
    base_dir: &Path,
    policy_file: &Path,
    errs: &mut Errors,
) -> RawPolicy {
    let top = Field {
        node: root,
        key_pos: Pos::START,
        path: "",
    };
    const TOP: &[&str] = &[
        "proxy",
        "admin",
        "ca",
        "audit",
        "credentials",
        "services",
        "capabilities",
        "agents",
        "passthrough",
    ];
    let Some(map) = Map::open(errs, top, TOP) else {
        return RawPolicy::empty(base_dir);
    };
    let proxy = map
        .get("proxy")
        .map(|f| read_proxy(f, errs))
        .unwrap_or_default();
    let admin = match map.get("admin") {
        Some(f) => read_admin(f, base_dir, proxy.listen, errs),
        None => {
            errs.push(
                Pos::START,
                "admin",
                "required key `admin` is missing (it holds `token`, the admin API's bearer token)",
            );
            None
        }
    };
    let (audit, audit_at) = read_audit(map.get("audit"), base_dir, errs);
    let raw = RawPolicy {
        proxy,
        admin,
        ca: read_ca(map.get("ca"), base_dir, errs),
        audit,
        credentials: named(map.get("credentials"), errs, |name, f, errs| {
            Some(RawCredential {
                name,
                source: read_credential(f, base_dir, errs),
            })
        }),
        services: named(map.get("services"), errs, |name, f, errs| {
            read_service(name, f, base_dir, errs)
        }),
        capabilities: named(map.get("capabilities"), errs, read_capability),
        agents: named(map.get("agents"), errs, read_agent),
        passthrough: map
            .get("passthrough")
            .map(|f| host_list(f, errs))
            .unwrap_or_default(),
    };
    if let (AuditTarget::File(path), Some(at)) = (&raw.audit.path, audit_at) {
        if let Some(what) = audit_clash(&raw, path, policy_file) {
            errs.push(
                at,
                "audit.path",
                format!("names {what}: audit records would be appended to it; give the audit log a file of its own"),
            );
        }
    }
    if let AuditTarget::File(path) = &raw.audit.path {
        if let Some(why) = audit_path_unusable(path) {
            errs.push(audit_at.unwrap_or(Pos::START), "audit.path", why);
        }
    }
    raw
}

/// What `serve` would refuse about the audit path as it is on disk now, so `check` (and a
/// reload) says it first: a directory, or a device that discards what is written (through
/// links too). Not for the names of standard output or error, which point at whatever `check`
/// has, not `serve`'s (`serve` looks at them itself).
fn audit_path_unusable(audit: &Path) -> Option<String> {
    if std::fs::metadata(audit).is_ok_and(|m| m.is_dir()) {
        return Some(format!(
            "`{}` is a directory; name a file (in it, say `audit.jsonl`)",
            audit.display()
        ));
    }
    let stream = [
        "/dev/stdout",
        "/dev/stderr",
        "/dev/fd",
        "/proc/self/fd",
        "/dev/tty",
    ]
    .iter()
    .any(|s| audit.starts_with(s));
    if !stream && crate::audit::discards(rustix::fs::stat(audit)) {
        return Some(format!("`{}` is a device that discards what is written: audit records would go nowhere; name a file, or `-` for standard output", audit.display()));
    }
    None
}

/// What else of the policy's files the audit log's path names, if anything (compared as
/// written, `.` and `..` resolved; a symbolic link is not followed).
fn audit_clash(raw: &RawPolicy, audit: &Path, policy_file: &Path) -> Option<String> {
    let audit = lexical(audit);
    let same = |other: &Path| lexical(other) == audit;
    if same(policy_file) {
        return Some("the policy file itself".into());
    }
    if same(&raw.ca.cert) {
        return Some("the CA certificate (`ca.cert`)".into());
    }
    if same(&raw.ca.key) {
        return Some("the CA key (`ca.key`)".into());
    }
    if let Some(SecretSource::File(f)) = raw.admin.as_ref().map(|a| &a.token) {
        if same(f) {
            return Some("the admin token's file".into());
        }
    }
    let credential = raw
        .credentials
        .iter()
        .find(|c| matches!(&c.source, Some((SecretSource::File(f), _)) if same(f)));
    if let Some(c) = credential {
        return Some(format!("the file of credential `{}`", c.name.value));
    }
    raw.services
        .iter()
        .find(|s| s.ca_file.as_ref().is_some_and(|f| same(&f.value)))
        .map(|s| format!("the `tls.ca_file` of service `{}`", s.name.value))
}

/// `path` with `.` dropped and `..` taking off the component before it, without asking the
/// file system.
fn lexical(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

impl RawPolicy {
    fn empty(base_dir: &Path) -> Self {
        RawPolicy {
            proxy: ProxySettings::default(),
            admin: None,
            ca: default_ca(base_dir),
            audit: AuditSettings {
                path: AuditTarget::File(base_dir.join("audit.jsonl")),
            },
            credentials: Vec::new(),
            services: Vec::new(),
            capabilities: Vec::new(),
            agents: Vec::new(),
            passthrough: Vec::new(),
        }
    }
}

/// A mapping of user-chosen names (`services: {github: ..., openai: ...}`) to entries.
fn named<T>(
    field: Option<Field<'_>>,
    errs: &mut Errors,
    mut read_one: impl FnMut(Located<String>, Field<'_>, &mut Errors) -> Option<T>,
) -> Vec<T> {
    let Some(field) = field else {
        return Vec::new();
    };
    let Some(entries) = field.entries(errs) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let path = super::yaml::join(field.path, entry.key);
        if let Err(why) = values::check_name(entry.key) {
            errs.push(entry.key_pos, &path, why);
        }
        let name = Located {
            value: entry.key.to_owned(),
            pos: entry.key_pos,
            path: path.clone(),
        };
        let f = Field {
            node: entry.node,
            key_pos: entry.key_pos,
            path: &path,
        };
        if let Some(item) = read_one(name, f, errs) {
            out.push(item);
        }
    }
    out
}

fn read_proxy(field: Field<'_>, errs: &mut Errors) -> ProxySettings {
    let mut p = ProxySettings::default();
    let Some(map) = Map::open(
        errs,
        field,
        &[
            "listen",
            "header_read_timeout",
            "idle_timeout",
            "send_timeout",
            "max_connections",
            "max_task_in_flight",
            "max_task_denials_per_second",
            "max_task_connections",
            "max_agent_connections",
            "max_header_bytes",
            "connect_timeout",
            "upstream_timeout",
            "shutdown_timeout",
        ],
    ) else {
        return p;
    };
    if let Some(v) = map.get("listen").and_then(|f| f.socket_addr(errs)) {
        p.listen = v;
    }
    let durations = [
        ("header_read_timeout", &mut p.header_read_timeout),
        ("idle_timeout", &mut p.idle_timeout),
        ("send_timeout", &mut p.send_timeout),
        ("connect_timeout", &mut p.connect_timeout),
        ("upstream_timeout", &mut p.upstream_timeout),
        ("shutdown_timeout", &mut p.shutdown_timeout),
    ];
    for (key, slot) in durations {
        if let Some(v) = map.get(key).and_then(|f| f.duration(errs, MS, DAY)) {
            *slot = v;
        }
    }
    if let Some(v) = map
        .get("max_connections")
        .and_then(|f| f.integer(errs, 1, 1_000_000))
    {
        p.max_connections = usize::try_from(v).unwrap_or(p.max_connections);
    }
    if let Some(v) = map
        .get("max_task_in_flight")
        .and_then(|f| f.integer(errs, 1, 1_000_000))
    {
        p.max_task_in_flight = u32::try_from(v).unwrap_or(p.max_task_in_flight);
    }
    if let Some(v) = map
        .get("max_task_denials_per_second")
        .and_then(|f| f.integer(errs, 1, 1_000_000))
    {
        p.max_task_denials_per_second = u32::try_from(v).unwrap_or(p.max_task_denials_per_second);
    }
    if let Some(v) = map
        .get("max_task_connections")
        .and_then(|f| f.integer(errs, 1, 1_000_000))
    {
        p.max_task_connections = u32::try_from(v).ok();
    }
    if let Some(v) = map
        .get("max_agent_connections")
        .and_then(|f| f.integer(errs, 1, 1_000_000))
    {
        p.max_agent_connections = u32::try_from(v).ok();
    }
    if let Some(v) = map
        .get("max_header_bytes")
        .and_then(|f| f.integer(errs, 1024, 16 * 1024 * 1024))
    {
        p.max_header_bytes = usize::try_from(v).unwrap_or(p.max_header_bytes);
    }
    p
}

/// Whether two listeners would fight over one port: the same port (0 asks for a fresh one each
/// time, so never) on the same address, or with either on a wildcard address (`0.0.0.0` or
/// `::` binds the port on every address).
fn listeners_clash(a: SocketAddr, b: SocketAddr) -> bool {
    // `[::ffff:127.0.0.1]` is 127.0.0.1 to a dual-stack socket.
    let (ia, ib) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() != 0
        && a.port() == b.port()
        && (ia == ib || ia.is_unspecified() || ib.is_unspecified())
}

fn read_admin(
    field: Field<'_>,
    base_dir: &Path,
    proxy_listen: SocketAddr,
    errs: &mut Errors,
) -> Option<AdminSettings> {
    let map = Map::open(errs, field, &["listen", "token", "max_tasks"])?;
    let listen = match map.get("listen") {
        Some(f) => f.socket_addr(errs).filter(|addr| {
            let clash = listeners_clash(*addr, proxy_listen);
            if clash {
                errs.push(f.pos(), f.path, "must not take `proxy.listen`'s port on the same address (a wildcard address takes it on every address)");
            }
            !clash
        }),
        None => {
            let default = SocketAddr::from(([127, 0, 0, 1], 8481));
            if listeners_clash(default, proxy_listen) {
                errs.push(field.pos(), field.path, "the default `listen` (127.0.0.1:8481) takes `proxy.listen`'s port: set `admin.listen`");
            }
            Some(default)
        }
    };
    let token = map
        .require(errs, "token")
        .and_then(|f| secret_source(f, base_dir, errs));
    let max_tasks = map
        .get("max_tasks")
        .and_then(|f| f.integer(errs, 1, 10_000_000))
        .and_then(|v| usize::try_from(v).ok())
        .unwrap_or(AdminSettings::DEFAULT_MAX_TASKS);
    Some(AdminSettings {
        listen: listen?,
        token: token?,
        max_tasks,
    })
}

fn default_ca(base_dir: &Path) -> CaSettings {
    CaSettings {
        cert: base_dir.join("certs/ca.pem"),
        key: base_dir.join("certs/ca-key.pem"),
    }
}

fn read_ca(field: Option<Field<'_>>, base_dir: &Path, errs: &mut Errors) -> CaSettings {
    let mut ca = default_ca(base_dir);
    let Some(map) = field.and_then(|f| Map::open(errs, f, &["cert", "key"])) else {
        return ca;
    };
    let mut key_at = None;
    for (key, slot) in [("cert", &mut ca.cert), ("key", &mut ca.key)] {
        if let Some(v) = map.get(key).and_then(|f| f.string(errs)) {
            *slot = base_dir.join(v.value);
            key_at = Some((v.pos, v.path));
        }
    }
    if let Some((pos, path)) = key_at.filter(|_| lexical(&ca.cert) == lexical(&ca.key)) {
        errs.push(pos, &path, "`ca.cert` and `ca.key` name the same file; the certificate and its private key are two files");
    }
    ca
}

/// The audit settings, and where `audit.path` is written (when it is).
fn read_audit(
    field: Option<Field<'_>>,
    base_dir: &Path,
    errs: &mut Errors,
) -> (AuditSettings, Option<Pos>) {
    let mut path = AuditTarget::File(base_dir.join("audit.jsonl"));
    let mut at = None;
    if let Some(map) = field.and_then(|f| Map::open(errs, f, &["path"])) {
        if let Some(v) = map.get("path").and_then(|f| f.string(errs)) {
            at = Some(v.pos);
            path = if v.value == "-" {
                AuditTarget::Stdout
            } else {
                AuditTarget::File(base_dir.join(v.value))
            };
        }
    }
    (AuditSettings { path }, at)
}

/// `env:NAME`, `file:PATH` or `{exec: [argv...]}`. Anything else is taken for a literal secret.
/// The source word `text` starts with when it is not a source as written: `env` or `file` in
/// another case (`ENV:NAME`, `File:x`), or `exec` in any case (`exec:cmd`, a scalar).
fn misspelt_source(text: &str) -> Option<&'static str> {
    let (prefix, _) = text.split_once(':')?;
    ["env", "file", "exec"]
        .into_iter()
        .find(|known| prefix.eq_ignore_ascii_case(known))
}

fn secret_source(field: Field<'_>, base_dir: &Path, errs: &mut Errors) -> Option<SecretSource> {
    match field.node {
        Node::Scalar(_) => {
            // (Says only which control character, never the text: it may be a secret.)
            let text = field.string(errs)?.value;
            if let Some(name) = text.strip_prefix("env:") {
                if values::check_env_name(name) {
                    return Some(SecretSource::Env(name.to_owned()));
                }
                errs.push(
                    field.pos(),
                    field.path,
                    "`env:` must be followed by an environment variable name (letters, digits, `_`)",
                );
            } else if let Some(path) = text.strip_prefix("file:") {
                if !path.is_empty() {
                    return Some(SecretSource::File(base_dir.join(path)));
                }
                errs.push(
                    field.pos(),
                    field.path,
                    "`file:` must be followed by a path",
                );
            } else if let Some(known) = misspelt_source(&text) {
                // (Only the known word is repeated, never the rest of the value.)
                let message = if known == "exec" {
                    "`exec` takes a command as a list: `{exec: [command, args...]}`".to_string()
                } else {
                    format!("sources are written in lower case: `{known}:`")
                };
                errs.push(field.pos(), field.path, message);
            } else {
                // SECURITY: whatever was written here may be the secret itself; say only that
                // it is not a source, never what it was.
                errs.push(field.pos(), field.path, LITERAL_SECRET);
            }
            None
        }
        Node::Mapping(_) => {
            let map = Map::open(errs, field, &["exec"])?;
            let exec = map.require(errs, "exec")?;
            let mut argv = Vec::new();
            for (i, _, node) in exec.items(errs)? {
                let path = format!("{}[{i}]", exec.path);
                let item = Field {
                    node,
                    key_pos: exec.key_pos,
                    path: &path,
                };
                // (An argument may hold a line break, a command's name may not.)
                argv.push(item.text(errs, i > 0)?.value);
            }
            let Some(command) = argv.first_mut() else {
                errs.push(
                    exec.key_pos,
                    exec.path,
                    "`exec` must name a command: `{exec: [command, args...]}`",
                );
                return None;
            };
            // A command with a `/` in it is a path, and a relative one is the policy's
            // neighbour (like every other path in the file), not the working directory's:
            // keyward may start anywhere (`/` in a container). A bare name is looked up in PATH.
            if command.contains('/') {
                *command = base_dir.join(&*command).to_string_lossy().into_owned();
            }
            Some(SecretSource::Exec { argv })
        }
        Node::Sequence(_) => {
            errs.push(field.key_pos, field.path, LITERAL_SECRET);
            None
        }
    }
}

fn read_credential(
    field: Field<'_>,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<(SecretSource, Option<Duration>)> {
    if field.node.as_mapping().is_none() {
        // `github_token: ghp_...` is the likeliest mistake here; never echo it.
        errs.push(
            field.pos(),
            field.path,
            "expected `{source: ...}`; literal secrets are not allowed",
        );
        return None;
    }
    let map = Map::open(errs, field, &["source", "refresh"])?;
    let source = secret_source(map.require(errs, "source")?, base_dir, errs)?;
    let refresh = map.get("refresh");
    match (&source, refresh) {
        (SecretSource::Exec { .. }, None) => Some((source, Some(DEFAULT_EXEC_REFRESH))),
        (SecretSource::Exec { .. }, Some(f)) => {
            let every = f.duration(errs, Duration::from_secs(1), DAY)?;
            Some((source, Some(every)))
        }
        (_, Some(f)) => {
            errs.push(
                f.key_pos,
                f.path,
                "`refresh` applies only to `exec` sources (`env` is read once, `file` is re-read when it changes)",
            );
            None
        }
        (_, None) => Some((source, None)),
    }
}

fn read_capability(
    name: Located<String>,
    field: Field<'_>,
    errs: &mut Errors,
) -> Option<RawCapability> {
    // A broken entry still defines its name, so references to it are not reported as well.
    let Some(map) = Map::open(errs, field, &["service", "risk", "routes"]) else {
        return Some(RawCapability {
            name,
            service: None,
            risk: Risk::default(),
            routes: Vec::new(),
        });
    };
    let service = map.require(errs, "service").and_then(|f| f.string(errs));
    let risk = match map.get("risk") {
        None => Risk::default(),
        Some(f) => match f.node.as_scalar().and_then(|s| Risk::parse(s.as_str())) {
            Some(r) => r,
            None => {
                errs.push(
                    f.pos(),
                    f.path,
                    "must be one of `low`, `medium`, `high`, `critical`",
                );
                Risk::default()
            }
        },
    };
    let mut routes = Vec::new();
    if let Some(f) = map.require(errs, "routes") {
        let items = f.items(errs).unwrap_or_default();
        if items.is_empty() && f.node.as_sequence().is_some() {
            errs.push(f.key_pos, f.path, "`routes` must list at least one route");
        }
        for (i, pos, node) in items {
            let path = format!("{}[{i}]", f.path);
            let item = Field {
                node,
                key_pos: pos,
                path: &path,
            };
            let Some(text) = item.string(errs) else {
                continue;
            };
            match RoutePattern::parse(&text.value) {
                Ok(route) => routes.push(Located {
                    value: route,
                    pos,
                    path,
                }),
                Err(why) => errs.push(pos, &path, why.to_string()),
            }
        }
    }
    Some(RawCapability {
        name,
        service,
        risk,
        routes,
    })
}

fn read_agent(name: Located<String>, field: Field<'_>, errs: &mut Errors) -> Option<RawAgent> {
    let map = Map::open(errs, field, &["owner", "capabilities", "max_ttl"])?;
    let owner = map
        .require(errs, "owner")
        .and_then(|f| f.string(errs))
        .map(|l| l.value);
    let mut capabilities = Vec::new();
    if let Some(f) = map.get("capabilities") {
        for (i, pos, node) in f.items(errs).unwrap_or_default() {
            let path = format!("{}[{i}]", f.path);
            let item = Field {
                node,
                key_pos: pos,
                path: &path,
            };
            capabilities.extend(item.string(errs));
        }
    } else {
        errs.push(
            map.pos,
            &super::yaml::join(map.path, "capabilities"),
            "required key `capabilities` is missing (the capabilities this agent may be granted)",
        );
    }
    let max_ttl = map
        .get("max_ttl")
        .and_then(|f| f.duration(errs, Duration::from_secs(1), 30 * DAY))
        .unwrap_or(DEFAULT_MAX_TTL);
    Some(RawAgent {
        name,
        owner,
        capabilities,
        max_ttl,
    })
}

#[cfg(test)]
mod tests {
    use crate::policy::model::SecretSource;
    use crate::policy::testing::{errors, ok, ADMIN};

    #[test]
    fn an_exec_command_with_a_slash_is_the_policy_files_neighbour() {
        let p = ok(&format!(
            "{ADMIN}credentials:\n  a: {{source: {{exec: [./get.sh, x]}}}}\n  b: {{source: {{exec: [bin/get, y]}}}}\n  c: {{source: {{exec: [/usr/bin/get]}}}}\n  d: {{source: {{exec: [vault, kv]}}}}\n"
        ));
        let argv: Vec<_> = p
            .credentials
            .iter()
            .map(|c| match &c.source {
                SecretSource::Exec { argv } => argv.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(argv[0], ["/etc/keyward/./get.sh", "x"]);
        assert_eq!(argv[1], ["/etc/keyward/bin/get", "y"]);
        assert_eq!(argv[2], ["/usr/bin/get"]);
        // A bare name is looked up in PATH when it runs.
        assert_eq!(argv[3], ["vault", "kv"]);
    }

    #[test]
    fn escaped_control_characters_in_sources_are_refused() {
        for (source, at) in [
            (r#""file:/a\0b""#, "credentials.a.source"),
            (r#""env:A\nB""#, "credentials.a.source"),
            (r#"{exec: ["get\nit"]}"#, "credentials.a.source.exec[0]"),
        ] {
            let errs = errors(&format!("{ADMIN}credentials:\n  a: {{source: {source}}}\n"));
            assert_eq!(errs.len(), 1, "{source}: {errs:?}");
            assert!(
                errs[0].contains(&format!("{at}: must not contain control characters")),
                "{source}: {errs:?}"
            );
        }
        // An argument may hold a line break (a script for `sh -c`).
        ok(&format!(
            "{ADMIN}credentials:\n  a: {{source: {{exec: [sh, -c, \"echo a\\necho b\"]}}}}\n"
        ));
    }

    #[test]
    fn unknown_keys_everywhere() {
        let text = format!(
            "{ADMIN}\
proxy:
  listen: 127.0.0.1:1
  bogus: 1
services:
  s:
    hosts: [a.example]
    injct: {{}}
capabilities:
  c:
    service: s
    routes: [GET /]
    description: x
extra: 1
"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:5:3: proxy.bogus: unknown key `bogus` (expected one of: listen, header_read_timeout, idle_timeout, send_timeout, max_connections, max_task_in_flight, max_task_denials_per_second, max_task_connections, max_agent_connections, max_header_bytes, connect_timeout, upstream_timeout, shutdown_timeout)",
                "p.yaml:9:5: services.s.injct: unknown key `injct`; did you mean `inject`?",
                "p.yaml:14:5: capabilities.c.description: unknown key `description` (expected one of: service, risk, routes)",
                "p.yaml:15:1: extra: unknown key `extra` (expected one of: proxy, admin, ca, audit, credentials, services, capabilities, agents, passthrough)",
            ]
        );
    }

    #[test]
    fn a_merge_key_is_named_as_such() {
        let errs = errors(&format!(
            "{ADMIN}agents:\n  a:\n    <<: {{owner: x}}\n    capabilities: []\n"
        ));
        assert!(
            errs.contains(&"p.yaml:5:5: agents.a: YAML merge keys (`<<`) are not supported; write the keys out".to_string()),
            "{errs:?}"
        );
    }

    #[test]
    fn duplicate_key() {
        let text = format!("{ADMIN}credentials:\n  a: {{source: env:A}}\n  a: {{source: env:B}}\n");
        assert_eq!(
            errors(&text),
            ["p.yaml:5:3: credentials.a: duplicate key `a` (first written at 4:3)"]
        );
    }

    #[test]
    fn literal_secrets_are_refused_and_never_echoed() {
        let text = "\
admin:
  token: s3cr3t-admin
credentials:
  a: {source: ghp_abcdef123}
  b: ghp_bare
  c: {source: 'env:'}
  d: {source: [x]}
  e: {source: {exec: []}}
  f: {source: ENV:GHP_NAME}
  g: {source: 'File:/run/ghp_x'}
  h: {source: 'exec:/bin/ghp_cat'}
";
        let errs = errors(text);
        assert_eq!(
            errs,
            [
                "p.yaml:2:10: admin.token: literal secrets are not allowed; write `env:NAME`, `file:PATH` or `{exec: [command, args...]}`",
                "p.yaml:4:15: credentials.a.source: literal secrets are not allowed; write `env:NAME`, `file:PATH` or `{exec: [command, args...]}`",
                "p.yaml:5:6: credentials.b: expected `{source: ...}`; literal secrets are not allowed",
                "p.yaml:6:15: credentials.c.source: `env:` must be followed by an environment variable name (letters, digits, `_`)",
                "p.yaml:7:7: credentials.d.source: literal secrets are not allowed; write `env:NAME`, `file:PATH` or `{exec: [command, args...]}`",
                "p.yaml:8:16: credentials.e.source.exec: `exec` must name a command: `{exec: [command, args...]}`",
                "p.yaml:9:15: credentials.f.source: sources are written in lower case: `env:`",
                "p.yaml:10:15: credentials.g.source: sources are written in lower case: `file:`",
                "p.yaml:11:15: credentials.h.source: `exec` takes a command as a list: `{exec: [command, args...]}`",
            ]
        );
        let all = errs.join("\n");
        for secret in ["s3cr3t", "ghp_"] {
            assert!(!all.contains(secret));
        }
    }

    #[test]
    fn secrets_pasted_as_keys_or_names_are_not_repeated() {
        let text = "\
admin: {token: env:T, ghp_16C7e42F292c6912E7710c838347Ae178B4a: 1}
credentials:
  k: {sk-live-1234abcd}
  j: {source: {exec: [x], hunter2: 1}}
  d: {source: env:D, xoxb-1: 1, xoxb-1: 2}
services:
  s:
    hosts: [s.example]
    inject: {header: X-Key, value: '${credential}', credential: ghp_16C7e42F292c6912E7710c838347Ae178B4a}
";
        let errs = errors(text);
        assert_eq!(
            errs,
            [
                "p.yaml:1:23: admin: unknown key (not repeated: it may be a secret; expected one of: listen, token, max_tasks)",
                "p.yaml:3:3: credentials.k.source: required key `source` is missing",
                "p.yaml:3:7: credentials.k: unknown key (not repeated: it may be a secret; expected one of: source, refresh)",
                "p.yaml:4:27: credentials.j.source: unknown key (not repeated: it may be a secret; expected one of: exec)",
                "p.yaml:5:22: credentials.d: unknown key (not repeated: it may be a secret; expected one of: source, refresh)",
                "p.yaml:5:33: credentials.d: duplicate key (not repeated: it may be a secret; first written at 5:22)",
                "p.yaml:9:65: services.s.inject.credential: undefined credential (not repeated: it looks like a secret, not the name of a credential)",
            ]
        );
        let all = errs.join("\n");
        for secret in ["ghp_", "sk-live", "hunter2", "xoxb"] {
            assert!(!all.contains(secret), "{secret} leaked: {all}");
        }
    }

    #[test]
    fn missing_admin_token() {
        assert_eq!(
            errors("admin:\n  listen: 127.0.0.1:1\n"),
            ["p.yaml:1:1: admin.token: required key `token` is missing"]
        );
        assert_eq!(
            errors("proxy: {}\n"),
            ["p.yaml:1:1: admin: required key `admin` is missing (it holds `token`, the admin API's bearer token)"]
        );
        assert_eq!(
            errors("admin:\n  token:\n"),
            ["p.yaml:2:3: admin.token: must not be empty"]
        );
    }

    #[test]
    fn admin_and_proxy_listeners_must_differ() {
        assert_eq!(
            errors("proxy: {listen: '127.0.0.1:9000'}\nadmin: {listen: '127.0.0.1:9000', token: env:T}\n"),
            ["p.yaml:2:17: admin.listen: must not take `proxy.listen`'s port on the same address (a wildcard address takes it on every address)"]
        );
        // A wildcard address takes the port on every address, either way round.
        for (proxy, admin) in [
            ("0.0.0.0:9000", "127.0.0.1:9000"),
            ("127.0.0.1:9000", "0.0.0.0:9000"),
            ("'[::]:9000'", "127.0.0.1:9000"),
            ("'[::ffff:127.0.0.1]:9000'", "127.0.0.1:9000"),
        ] {
            let text =
                format!("proxy: {{listen: {proxy}}}\nadmin: {{listen: {admin}, token: env:T}}\n");
            assert_eq!(errors(&text).len(), 1, "{text}");
        }
        assert!(errors(
            "proxy: {listen: '0.0.0.0:9000'}\nadmin: {listen: '127.0.0.1:9001', token: env:T}\n"
        )
        .is_empty());
        // The admin listener's default port, taken by the proxy on a wildcard address.
        assert_eq!(
            errors("proxy: {listen: '0.0.0.0:8481'}\nadmin: {token: env:T}\n"),
            ["p.yaml:2:1: admin: the default `listen` (127.0.0.1:8481) takes `proxy.listen`'s port: set `admin.listen`"]
        );
        // Port 0 (tests, scripts) is a fresh port each time.
        assert!(errors(
            "proxy: {listen: '127.0.0.1:0'}\nadmin: {listen: '127.0.0.1:0', token: env:T}\n"
        )
        .is_empty());
    }

    #[test]
    fn bad_durations_and_numbers() {
        let text = format!(
            "{ADMIN}\
proxy:
  idle_timeout: 90
  connect_timeout: 0s
  max_connections: -1
  listen: localhost:80
  max_header_bytes: \"8192\"
credentials:
  v: {{source: env:V, refresh: 5m}}
agents:
  a: {{owner: o, capabilities: [], max_ttl: 90d}}
"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:4:17: proxy.idle_timeout: must be a duration with a unit, like `30s`, `5m` or `1h`",
                "p.yaml:5:20: proxy.connect_timeout: must be between 1ms and 1day",
                "p.yaml:6:20: proxy.max_connections: must be a whole number from 1 to 1000000",
                "p.yaml:7:11: proxy.listen: must be an IP address and port, like `127.0.0.1:8480` or `[::1]:8480`",
                "p.yaml:8:21: proxy.max_header_bytes: must be a whole number from 1024 to 16777216, not a quoted string",
                "p.yaml:10:22: credentials.v.refresh: `refresh` applies only to `exec` sources (`env` is read once, `file` is re-read when it changes)",
                "p.yaml:12:44: agents.a.max_ttl: must be between 1s and 30days",
            ]
        );
    }

    #[test]
    fn wrong_types_and_names() {
        let text = format!(
            "{ADMIN}\
services: [a, b]
capabilities:
  'bad name':
    service: [x]
    routes: GET /x
    risk: extreme
agents:
  a:
    owner: {{x: 1}}
    capabilities: [{{}}]
  b: {{}}
"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:3:1: services: expected a mapping of `key: value`",
                "p.yaml:5:3: capabilities.bad name: names must start with a letter or digit and use only letters, digits, `.`, `_` and `-` (at most 128)",
                "p.yaml:6:5: capabilities.bad name.service: expected a string",
                "p.yaml:7:13: capabilities.bad name.routes: expected a list (`[a, b]` or `- a` lines)",
                "p.yaml:8:11: capabilities.bad name.risk: must be one of `low`, `medium`, `high`, `critical`",
                "p.yaml:11:5: agents.a.owner: expected a string",
                "p.yaml:12:20: agents.a.capabilities[0]: expected a string",
                "p.yaml:13:3: agents.b.owner: required key `owner` is missing",
                "p.yaml:13:3: agents.b.capabilities: required key `capabilities` is missing (the capabilities this agent may be granted)",
            ]
        );
    }
}
