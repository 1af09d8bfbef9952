//! The policy file (SPEC §3): read, validate, and hand out as plain data.
//!
//! Loading runs in two stages and reports every problem at once, sorted by position:
//! `yaml` (text → node tree; one document, no duplicate keys) → `file` (tree → raw mirror;
//! unknown keys, types, values) → `check` (references, duplicates, cleartext, overlapping
//! services) → `model::Policy`. This module must never read a secret's value, and no error it
//! produces may contain one.

mod check;
mod compile;
mod error;
mod file;
mod model;
mod service;
mod values;
mod yaml;

use std::path::Path;

use sha2::{Digest, Sha256};

pub use compile::{CompiledPolicy, HostTable, RouteRef};
pub use error::{PolicyError, PolicyErrors};
pub use model::{
    AdminSettings, AgentDef, AuditSettings, AuditTarget, CaSettings, CapabilityDef, CredentialDef,
    HostPattern, Injection, Policy, ProxySettings, Risk, Scheme, SecretSource, ServiceDef,
};
pub(crate) use values::{check_name, hide_pasted_parts, parse_duration};

use error::{Errors, Pos};

/// A policy larger than this is refused unread: real ones are a few kilobytes.
const MAX_POLICY_BYTES: u64 = 4 * 1024 * 1024;

/// Reads and validates the policy at `path`. Relative paths inside it (CA, audit log,
/// `file:` sources, `tls.ca_file`) are resolved against the file's directory.
pub fn load(path: &Path) -> Result<Policy, PolicyErrors> {
    let name = path.display().to_string();
    let fail = |message: String| {
        let mut errs = Errors::new(&name);
        errs.push(Pos::START, "", message);
        errs.finish()
    };
    let mut bytes = Vec::new();
    crate::files::read_regular(path, MAX_POLICY_BYTES, &mut bytes).map_err(|e| match e {
        crate::files::ReadError::TooLarge(_) => fail(format!("the policy file is {e}")),
        e => fail(format!("cannot read the policy file: {e}")),
    })?;
    let text = String::from_utf8(bytes).map_err(|e| {
        let valid = e.utf8_error().valid_up_to();
        let prefix = e.as_bytes().get(..valid).unwrap_or_default();
        let mut errs = Errors::new(&name);
        errs.push(
            pos_after(&String::from_utf8_lossy(prefix)),
            "",
            "the policy file is not valid UTF-8 here",
        );
        errs.finish()
    })?;
    let base_dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let policy = parse(&name, &text, base_dir)?;
    if let Some(what) = audit_names_another_file(&policy, path) {
        return Err(fail(format!("audit.path is the same file as {what} (another spelling, or a link): audit records would be appended to it; give the audit log a file of its own")));
    }
    Ok(policy)
}

/// The other file of the policy's that `audit.path` names, found by what the paths name on
/// disk (device and inode): the spelling check of `parse` (`file::audit_clash`) cannot see
/// an absolute path against a relative one, a symbolic or a hard link. Only files that exist
/// are compared (one created later, by `serve`, is new).
fn audit_names_another_file(policy: &Policy, policy_file: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let AuditTarget::File(audit) = &policy.audit.path else {
        return None;
    };
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    let audit = id(audit)?;
    let mut others: Vec<(String, &Path)> = vec![
        ("the policy file itself".into(), policy_file),
        ("the CA certificate (`ca.cert`)".into(), &policy.ca.cert),
        ("the CA key (`ca.key`)".into(), &policy.ca.key),
    ];
    if let SecretSource::File(f) = &policy.admin.token {
        others.push(("the admin token's file".into(), f));
    }
    for c in &policy.credentials {
        if let SecretSource::File(f) = &c.source {
            others.push((format!("the file of credential `{}`", c.name), f));
        }
    }
    for s in &policy.services {
        if let Some(f) = &s.ca_file {
            others.push((format!("the `tls.ca_file` of service `{}`", s.name), f));
        }
    }
    others
        .into_iter()
        .find(|(_, p)| id(p) == Some(audit))
        .map(|(what, _)| what)
}

/// Validates policy `text`; `file_name` names it in error positions (and, in `base_dir`, the
/// file `audit.path` must not name); `base_dir` resolves relative paths. `Policy::version` is
/// a hash of `text`.
pub fn parse(file_name: &str, text: &str, base_dir: &Path) -> Result<Policy, PolicyErrors> {
    let mut errs = Errors::new(file_name);
    if forbidden_characters(text, &mut errs) {
        return Err(errs.finish());
    }
    let Some(root) = yaml::parse_document(text, &mut errs) else {
        return Err(errs.finish());
    };
    let own = base_dir.join(Path::new(file_name).file_name().unwrap_or_default());
    let raw = file::read(&root, base_dir, &own, &mut errs);
    let policy = check::check(raw, version_of(text), &mut errs);
    match policy {
        Some(policy) if errs.is_empty() => Ok(policy),
        _ => {
            if errs.is_empty() {
                // Every path that drops an entry reports why; this only guards that promise.
                errs.push(Pos::START, "", "the policy was rejected without a reported reason (a keyward bug; please report it)");
            }
            Err(errs.finish())
        }
    }
}

/// Reports every character YAML 1.2 does not allow in a stream (§5.1): C0 controls but tab,
/// LF and CR, DEL, C1 controls but NEL, U+FFFE and U+FFFF. Why before parsing: a YAML parser
/// may stop at a NUL and accept what came before it, so the policy enforced would be less
/// than the file (and its `policy_version`) says; and a control character hides in review.
fn forbidden_characters(text: &str, errs: &mut Errors) -> bool {
    const MAX_REPORTED: usize = 20;
    let forbidden = |c: char| {
        matches!(c, '\u{0}'..='\u{8}' | '\u{b}' | '\u{c}' | '\u{e}'..='\u{1f}' | '\u{7f}')
            || (('\u{80}'..='\u{9f}').contains(&c) && c != '\u{85}')
            || matches!(c, '\u{fffe}' | '\u{ffff}')
    };
    let found: Vec<(usize, char)> = text
        .char_indices()
        .filter(|&(_, c)| forbidden(c))
        .take(MAX_REPORTED)
        .collect();
    for &(at, c) in &found {
        let prefix = text.get(..at).unwrap_or_default();
        let pos = pos_after(prefix);
        // A key path for one written in a line's keys or values, not for one in a comment or
        // at a line's start (between two keys, the path would name the wrong one).
        let line = prefix
            .rfind(['\n', '\r'])
            .map_or(prefix, |i| prefix.get(i + 1..).unwrap_or_default())
            .trim_start();
        let path = if line.is_empty() || line.starts_with('#') {
            String::new()
        } else {
            yaml::path_at(text, pos)
        };
        errs.push(
            pos,
            &path,
            format!(
                "the control character U+{:04X} is not allowed in a policy file",
                u32::from(c)
            ),
        );
    }
    !found.is_empty()
}

/// The position of the character right after `prefix` (1-based; columns count characters;
/// lines end at LF, CR LF or a lone CR, as YAML's do).
fn pos_after(prefix: &str) -> Pos {
    let (mut line, mut column, mut after_cr) = (1, 1, false);
    for c in prefix.chars() {
        match c {
            '\n' if after_cr => {}
            '\n' | '\r' => (line, column) = (line + 1, 1),
            _ => column += 1,
        }
        after_cr = c == '\r';
    }
    Pos::new(line, column)
}

/// First 16 hex characters of sha256 over the file's bytes.
fn version_of(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Shared by the policy tests: parse with a fixed file name and base directory.
#[cfg(test)]
pub(crate) mod testing {
    use super::{parse, Policy};
    use std::path::Path;

    /// The smallest valid policy.
    pub const ADMIN: &str = "admin:\n  token: env:KEYWARD_ADMIN_TOKEN\n";

    /// Every error's `Display`, in order; empty when the policy is valid.
    pub fn errors(text: &str) -> Vec<String> {
        match parse("p.yaml", text, Path::new("/etc/keyward")) {
            Ok(_) => Vec::new(),
            Err(e) => e.0.iter().map(ToString::to_string).collect(),
        }
    }

    pub fn ok(text: &str) -> Policy {
        match parse("p.yaml", text, Path::new("/etc/keyward")) {
            Ok(p) => p,
            Err(e) => panic!("policy rejected:\n{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{errors, ok, ADMIN};
    use super::*;
    use std::path::PathBuf;
    use std::time::Duration;

    fn example(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("policy")
            .join(name)
    }

    #[test]
    fn control_characters_are_refused_where_they_are() {
        // A NUL used to end the parse: everything after it (here every agent) was dropped.
        let text = format!(
            "{ADMIN}services:\n  s: {{hosts: [s.example]}}\n\0agents:\n  bot: {{owner: t, capabilities: [], max_ttl: 1h}}\n"
        );
        assert_eq!(
            errors(&text),
            ["p.yaml:5:1: the control character U+0000 is not allowed in a policy file"]
        );
        // Every one is reported, in a scalar or a comment alike; columns count characters.
        let text = format!("{ADMIN}# \u{7f}\nservices:\n  s: {{hosts: [\"é\u{7}x\"]}}\n");
        assert_eq!(
            errors(&text),
            [
                "p.yaml:3:3: the control character U+007F is not allowed in a policy file",
                "p.yaml:5:17: services.s.hosts: the control character U+0007 is not allowed in a policy file",
            ]
        );
        // Lines that end in a lone CR count as lines.
        assert_eq!(
            errors("# a\r# b\r\n# \u{1}\n"),
            ["p.yaml:3:3: the control character U+0001 is not allowed in a policy file"]
        );
        // Tabs, CR LF line ends and NEL are YAML's own.
        let text = format!(
            "{ADMIN}services:\r\n  s: {{hosts: [s.example]}}\t# tab \u{85}\r\ncapabilities: {{}}\nagents: {{}}\n"
        );
        assert_eq!(errors(&text), Vec::<String>::new());
    }

    #[test]
    fn escaped_control_characters_are_refused_too() {
        // YAML's escapes spell what the raw check above cannot see.
        let text = format!(
            "{ADMIN}services: {{s: {{hosts: [s.example]}}}}\ncapabilities: {{}}\nagents:\n  bot: {{owner: \"a\\0b\", capabilities: [], max_ttl: 1h}}\n"
        );
        assert_eq!(
            errors(&text),
            ["p.yaml:6:16: agents.bot.owner: must not contain control characters (found U+0000)"]
        );
        let text = format!(
            "{ADMIN}services: {{s: {{hosts: [\"s.example\\e[2J\"]}}}}\ncapabilities: {{}}\nagents: {{}}\n"
        );
        assert_eq!(
            errors(&text),
            ["p.yaml:3:24: services.s.hosts[0]: must not contain control characters (found U+001B)"]
        );
        // A command's arguments may span lines (a script for `sh -c`); a tab is text anywhere.
        let text = format!(
            "{ADMIN}credentials:\n  k: {{source: {{exec: [sh, -c, \"echo a\\n\\techo b\"]}}}}\nservices: {{}}\ncapabilities: {{}}\nagents: {{}}\n"
        );
        assert_eq!(errors(&text), Vec::<String>::new());
    }

    #[test]
    fn invalid_utf8_is_reported_where_it_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.yaml");
        let mut bytes = format!("{ADMIN}services:\n  s: {{hosts: [é").into_bytes();
        bytes.extend_from_slice(b"\xff]}\n");
        std::fs::write(&path, bytes).unwrap();
        let err = load(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}:4:16: the policy file is not valid UTF-8 here",
                path.display()
            )
        );
    }

    #[test]
    fn example_policy_loads() {
        let path = example("example.yaml");
        let p = load(&path).unwrap_or_else(|e| panic!("{e}"));
        let dir = path.parent().unwrap();
        assert_eq!(
            p.admin.token,
            SecretSource::Env("KEYWARD_ADMIN_TOKEN".into())
        );
        assert_eq!(p.ca.cert, dir.join("../certs/ca.pem"));
        assert_eq!(p.ca.key, dir.join("../certs/ca-key.pem"));
        assert_eq!(p.audit.path, AuditTarget::File(dir.join("../audit.jsonl")));
        let names: Vec<&str> = p.services.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["github", "openai", "anthropic"]);
        for s in &p.services {
            let cred = &p.credentials[s.inject.as_ref().unwrap().credential()];
            assert!(matches!(cred.source, SecretSource::Env(_)), "{}", s.name);
        }
        let agent = &p.agents[p.agent_index("triage-bot").unwrap()];
        assert_eq!(agent.capabilities.len(), 4);
        assert_eq!(agent.max_ttl, Duration::from_secs(3600));
    }

    #[test]
    fn coding_agent_policy_loads() {
        let p = load(&example("coding-agent.yaml")).unwrap_or_else(|e| panic!("{e}"));
        let cap = |name: &str| &p.capabilities[p.capability_index(name).unwrap()];
        assert_eq!(cap("github.pulls.merge").risk, Risk::High);
        assert_eq!(cap("github.repo.read").risk, Risk::Low);
        let push = cap("github.branch.update");
        assert!(push
            .route_text
            .contains(&"PATCH /repos/{owner}/{repo}/git/refs/heads/{*branch}".to_string()));
        // Publishing is not granted anywhere: no write method reaches npm or PyPI.
        for name in ["npm.read", "pypi.read", "pypi.files.read"] {
            for route in &cap(name).routes {
                assert!(route
                    .methods
                    .iter()
                    .all(|m| m == http::Method::GET || m == http::Method::HEAD));
            }
        }
        // No deployment routes in the CI bundle.
        assert!(cap("github.ci.read")
            .route_text
            .iter()
            .all(|r| r.starts_with("GET ") && !r.contains("deployments")));
        let anthropic = &p.services[p.service_index("anthropic").unwrap()];
        match &anthropic.inject {
            Some(Injection::Header {
                name,
                prefix,
                suffix,
                ..
            }) => {
                assert_eq!(name.as_str(), "x-api-key");
                assert!(prefix.is_empty() && suffix.is_empty());
            }
            other => panic!("unexpected injection {other:?}"),
        }
        assert_eq!(p.agents.len(), 2);
    }

    #[test]
    fn spec_example_loads() {
        let text = r#"
proxy:
  listen: 127.0.0.1:8480          # where agents send traffic
admin:
  listen: 127.0.0.1:8481          # admin API, /metrics, /healthz, /readyz
  token: env:KEYWARD_ADMIN_TOKEN  # bearer token for /v1/*
ca:
  cert: certs/ca.pem              # created with its key on first start if both are missing
  key: certs/ca-key.pem
audit:
  path: audit.jsonl               # or "-" for stdout

credentials:
  github_token: { source: env:GITHUB_TOKEN }
  openai_key:   { source: file:/run/secrets/openai }
  vault_db:     { source: { exec: [vault, kv, get, -field=token, secret/db] }, refresh: 10m }

services:
  github:
    hosts: [api.github.com]          # exact names; "*.example.com" matches one label
    scheme: https                    # default https; port defaults to 443 / 80
    inject: { header: Authorization, value: "Bearer ${credential}", credential: github_token }
  openai:
    hosts: [api.openai.com]
    inject: { header: Authorization, value: "Bearer ${credential}", credential: openai_key }
  internal:
    hosts: [api.internal.test]
    port: 9443
    connect_to: 127.0.0.1:9443       # optional: dial this address instead of resolving the host
    tls: { ca_file: certs/upstream-ca.pem }   # extra roots; verification is never off
    inject: { query: api_key, credential: vault_db }

capabilities:
  github.issues.read:
    service: github
    risk: low                        # low | medium | high | critical
    routes:
      - GET /repos/{owner}/{repo}/issues
      - GET /repos/{owner}/{repo}/issues/{number}
  github.issues.comment:
    service: github
    risk: medium
    routes: [POST /repos/{owner}/{repo}/issues/{number}/comments]
  openai.chat:
    service: openai
    routes: [POST /v1/chat/completions, POST /v1/responses]

agents:
  triage-bot:
    owner: platform-team
    capabilities: [github.issues.read, github.issues.comment, openai.chat]
    max_ttl: 1h

passthrough: []                      # hosts tunnelled blind (no inspection, no credential)
"#;
        // `tls.ca_file` is read when the policy is checked: give it a real CA certificate.
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        std::fs::create_dir(base.join("certs")).unwrap();
        crate::tls::ca::CertAuthority::create(
            &base.join("certs/upstream-ca.pem"),
            &base.join("certs/upstream-ca-key.pem"),
        )
        .unwrap();
        let p = parse("p.yaml", text, base).unwrap_or_else(|e| panic!("policy rejected:\n{e}"));
        assert_eq!(p.version.len(), 16);
        assert!(p.version.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(p.proxy.listen, "127.0.0.1:8480".parse().unwrap());
        assert_eq!(
            p.proxy,
            ProxySettings {
                listen: p.proxy.listen,
                ..ProxySettings::default()
            }
        );
        assert_eq!(p.admin.listen, "127.0.0.1:8481".parse().unwrap());
        assert_eq!(p.ca.cert, base.join("certs/ca.pem"));
        assert_eq!(p.audit.path, AuditTarget::File(base.join("audit.jsonl")));
        assert_eq!(
            p.credentials[1].source,
            SecretSource::File("/run/secrets/openai".into())
        );
        assert_eq!(p.credentials[0].refresh, None);
        assert_eq!(
            p.credentials[2],
            CredentialDef {
                name: "vault_db".into(),
                source: SecretSource::Exec {
                    argv: ["vault", "kv", "get", "-field=token", "secret/db"]
                        .map(String::from)
                        .to_vec()
                },
                refresh: Some(Duration::from_secs(600)),
            }
        );
        let internal = &p.services[2];
        assert_eq!(
            internal.hosts,
            [HostPattern::Exact("api.internal.test".into())]
        );
        assert_eq!((internal.scheme, internal.port), (Scheme::Https, 9443));
        assert_eq!(internal.connect_to, Some(("127.0.0.1".into(), 9443)));
        assert_eq!(internal.ca_file, Some(base.join("certs/upstream-ca.pem")));
        assert_eq!(
            internal.inject,
            Some(Injection::Query {
                param: "api_key".into(),
                credential: 2
            })
        );
        assert_eq!(p.services[0].port, 443);
        assert_eq!(
            p.services[0].inject,
            Some(Injection::Header {
                name: http::header::AUTHORIZATION,
                prefix: "Bearer ".into(),
                suffix: String::new(),
                credential: 0
            })
        );
        let comment = &p.capabilities[1];
        assert_eq!((comment.service, comment.risk), (0, Risk::Medium));
        assert_eq!(
            comment.route_text,
            ["POST /repos/{owner}/{repo}/issues/{number}/comments"]
        );
        assert_eq!(p.capabilities[2].risk, Risk::Low);
        assert_eq!(p.agents[0].capabilities, [0, 1, 2]);
        assert_eq!(p.agents[0].owner, "platform-team");
        assert!(p.passthrough.is_empty());
    }

    // SPEC §3 writes `routes: [POST /repos/{owner}/...]`, which is not YAML (`{` ends a plain
    // scalar inside `[...]`): keyward reads it as the SPEC means it, with every position true.
    #[test]
    fn flow_routes_with_unquoted_braces_are_read_as_written() {
        let services = "services: {s: {hosts: [a.example]}}\ncapabilities:\n";
        let p = ok(&format!(
            "{ADMIN}{services}  c:\n    service: s\n    routes: [GET /a/{{id}}, POST /b/{{x}}/c/{{*rest}}, PUT|PATCH /d/{{y}} ]  # c\n  d: {{service: s, routes: [GET /e/{{z}}]}}\n"
        ));
        assert_eq!(
            p.capabilities[0].route_text,
            ["GET /a/{id}", "POST /b/{x}/c/{*rest}", "PUT|PATCH /d/{y}"]
        );
        assert_eq!(p.capabilities[1].route_text, ["GET /e/{z}"]);

        // A route's own error still points at the item as written.
        let errs = errors(&format!(
            "{ADMIN}{services}  c:\n    service: s\n    routes: [GET /a/{{id}}, GET /b/{{id}}/{{id}}]\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("p.yaml:7:27: capabilities.c.routes[1]: "),
            "{errs:?}"
        );
        assert!(errs[0].contains("parameter `id` appears twice"), "{errs:?}");

        // An item the swap could blur (a `<` of its own, a `:`, a comment) is left to the
        // YAML error, which says how to write it.
        // So is one on a line that does not open its list: it may be a value continued from
        // the line above (an `exec` argument, say), whose braces could not be put back.
        for item in [
            "GET /a/{id}<",
            "GET /a/{id}:x",
            "GET /a/{id} #c",
            "/a/{id}",
            "GET /a,\n      GET /b/{id}",
            "GET /a\n      /b/{id}",
        ] {
            let errs = errors(&format!(
                "{ADMIN}{services}  c:\n    service: s\n    routes: [{item}]\n"
            ));
            assert_eq!(errs.len(), 1, "{item}: {errs:?}");
            assert!(
                errs[0].contains("invalid YAML") && errs[0].contains("must be quoted"),
                "{item}: {errs:?}"
            );
        }
        // A quoted item after a swapped one is left alone, commas and braces included.
        let p = ok(&format!(
            "{ADMIN}{services}  c:\n    service: s\n    routes: [GET /a/{{id}}, \"GET /x/a,b/{{id}}/c,d\", GET /y/{{z}}]\n"
        ));
        assert_eq!(
            p.capabilities[0].route_text,
            ["GET /a/{id}", "GET /x/a,b/{id}/c,d", "GET /y/{z}"]
        );
        // Valid YAML is read as YAML: a flow mapping stays a mapping.
        let errs = errors(&format!(
            "{ADMIN}{services}  c:\n    service: s\n    routes: [{{GET: /a}}]\n"
        ));
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("p.yaml:7:15: capabilities.c.routes[0]: expected a string"),
            "{errs:?}"
        );
    }

    #[test]
    fn minimal_policy_gets_defaults() {
        let p = ok(ADMIN);
        assert_eq!(p.proxy, ProxySettings::default());
        assert_eq!(p.admin.listen, "127.0.0.1:8481".parse().unwrap());
        assert_eq!(p.ca.cert, Path::new("/etc/keyward/certs/ca.pem"));
        assert_eq!(p.ca.key, Path::new("/etc/keyward/certs/ca-key.pem"));
        assert_eq!(
            p.audit.path,
            AuditTarget::File("/etc/keyward/audit.jsonl".into())
        );
        assert!(p.services.is_empty() && p.agents.is_empty());
        assert_eq!(p.proxy.task_connections_limit(), 1024);
    }

    // The audit log appends to its file: a path that names another of the policy's files
    // would corrupt it (the policy itself fails its next load; the CA key, its key). Nor can
    // the CA's certificate and key share a file (`serve` would refuse to create the second).
    #[test]
    fn files_that_would_be_written_over_are_refused() {
        let cases = [
            (
                "audit: {path: p.yaml}\n",
                "p.yaml:3:15: audit.path: names the policy file itself",
            ),
            (
                "audit: {path: ./certs/../certs/ca-key.pem}\n",
                "p.yaml:3:15: audit.path: names the CA key (`ca.key`)",
            ),
            (
                "ca: {cert: a.pem, key: b.pem}\naudit: {path: a.pem}\n",
                "p.yaml:4:15: audit.path: names the CA certificate (`ca.cert`)",
            ),
            (
                "audit: {path: /run/k}\ncredentials: {k: {source: 'file:/run/k'}}\n",
                "p.yaml:3:15: audit.path: names the file of credential `k`",
            ),
            (
                "ca: {cert: same.pem, key: ./same.pem}\n",
                "p.yaml:3:27: ca.key: `ca.cert` and `ca.key` name the same file",
            ),
        ];
        for (text, want) in cases {
            let errs = errors(&format!("{ADMIN}{text}"));
            assert!(
                errs.len() == 1 && errs[0].starts_with(want),
                "{text}: {errs:?}"
            );
        }
        ok(&format!("{ADMIN}audit: {{path: logs/p.yaml}}\n"));
    }

    #[test]
    fn settings_and_less_common_forms() {
        let p = ok(&format!(
            "{ADMIN}\
proxy:
  listen: '[::1]:0'
  header_read_timeout: 5s
  idle_timeout: 2m
  send_timeout: 45s
  max_connections: 10
  max_header_bytes: 8192
  connect_timeout: 1s 500ms
  upstream_timeout: 1h
  shutdown_timeout: 25s
audit: {{path: '-'}}
credentials:
  c: {{source: {{exec: [op, read, 'op://vault/item/field']}}}}
services:
  plain:
    hosts: ['*.Internal.Example.', '10.0.0.1', '[::1]']
    scheme: http
    allow_cleartext: true
    inject: {{basic: {{username: bot}}, credential: c}}
  other:
    hosts: [a.internal.example]
    port: 8443
passthrough: [updates.example.org]
"
        ));
        assert_eq!(p.proxy.listen, "[::1]:0".parse().unwrap());
        assert_eq!(p.proxy.connect_timeout, Duration::from_millis(1500));
        assert_eq!(p.proxy.shutdown_timeout, Duration::from_secs(25));
        assert_eq!(p.proxy.send_timeout, Duration::from_secs(45));
        assert_eq!(p.proxy.max_header_bytes, 8192);
        // A quarter of max_connections, unless set.
        assert_eq!(p.proxy.task_connections_limit(), 2);
        let set = ok(&format!(
            "{ADMIN}proxy: {{max_connections: 2, max_task_connections: 3}}\n"
        ));
        assert_eq!(set.proxy.task_connections_limit(), 3);
        let tiny = ok(&format!("{ADMIN}proxy: {{max_connections: 3}}\n"));
        assert_eq!(tiny.proxy.task_connections_limit(), 1);
        // Half of max_connections for all of an agent's tasks, unless set.
        assert_eq!(p.proxy.agent_connections_limit(), 5);
        assert_eq!(tiny.proxy.agent_connections_limit(), 1);
        let set = ok(&format!(
            "{ADMIN}proxy: {{max_connections: 8, max_agent_connections: 7}}\n"
        ));
        assert_eq!(set.proxy.agent_connections_limit(), 7);
        assert_eq!(p.audit.path, AuditTarget::Stdout);
        assert_eq!(p.credentials[0].refresh, Some(Duration::from_secs(300)));
        let plain = &p.services[0];
        assert_eq!(
            plain.hosts,
            [
                HostPattern::Wildcard("internal.example".into()),
                HostPattern::Exact("10.0.0.1".into()),
                HostPattern::Exact("::1".into())
            ]
        );
        assert_eq!(
            (plain.scheme, plain.port, plain.allow_cleartext),
            (Scheme::Http, 80, true)
        );
        assert_eq!(
            plain.inject,
            Some(Injection::Basic {
                username: "bot".into(),
                credential: 0
            })
        );
        assert_eq!(
            p.passthrough,
            [HostPattern::Exact("updates.example.org".into())]
        );
    }

    #[test]
    fn syntax_error_is_reported_alone() {
        assert_eq!(
            errors("admin:\n  token: [env:X\nproxy: {}\n"),
            ["p.yaml:3:6: admin.token: invalid YAML: illegal placement of ':' indicator"]
        );
    }

    #[test]
    fn load_reports_io_and_encoding_problems() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.yaml");
        let errs = load(&missing).unwrap_err();
        assert_eq!(errs.0.len(), 1);
        let shown = errs.to_string();
        assert!(
            shown.starts_with(&format!(
                "{}:1:1: cannot read the policy file: ",
                missing.display()
            )),
            "{shown}"
        );

        // A FIFO (or a device) would hold the read, and a reload with it: refused unread.
        let fifo = dir.path().join("fifo.yaml");
        rustix::fs::mkfifoat(rustix::fs::CWD, &fifo, rustix::fs::Mode::RUSR).unwrap();
        assert_eq!(
            load(&fifo).unwrap_err().to_string(),
            format!(
                "{}:1:1: cannot read the policy file: not a regular file",
                fifo.display()
            )
        );
        let huge = dir.path().join("huge.yaml");
        std::fs::write(&huge, vec![b'#'; MAX_POLICY_BYTES as usize + 1]).unwrap();
        assert_eq!(
            load(&huge).unwrap_err().to_string(),
            format!(
                "{}:1:1: the policy file is larger than 4 MiB",
                huge.display()
            )
        );

        let binary = dir.path().join("bin.yaml");
        std::fs::write(&binary, b"admin: \xff\n").unwrap();
        assert_eq!(
            load(&binary).unwrap_err().to_string(),
            format!(
                "{}:1:8: the policy file is not valid UTF-8 here",
                binary.display()
            )
        );
    }

    #[test]
    fn load_resolves_paths_against_the_file_and_hashes_its_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyward.yaml");
        let text = format!("{ADMIN}credentials:\n  k: {{source: file:secrets/k}}\n");
        std::fs::write(&path, &text).unwrap();
        let p = load(&path).unwrap();
        assert_eq!(
            p.credentials[0].source,
            SecretSource::File(dir.path().join("secrets/k"))
        );
        assert_eq!(p.ca.cert, dir.path().join("certs/ca.pem"));
        assert_eq!(p.version, ok(&text).version);
        assert_ne!(p.version, ok(ADMIN).version);
        // sha256("") starts with e3b0c44298fc1c14.
        assert_eq!(version_of(""), "e3b0c44298fc1c14");
    }
}
