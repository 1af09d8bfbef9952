//! Stage two of loading: the rules that relate entries to each other — references resolve,
//! nothing is listed twice, cleartext is explicit, and no request could be claimed by two
//! services (SPEC §3, §4.5) — then the validated `Policy` with indices for names.
//!
//! Must never read the file system or the environment (secrets are read by `credentials`
//! later), and never put a value into a message except the names of credentials, services and
//! capabilities.

use crate::matcher::overlap::OverlapIndex;
use crate::matcher::route::RoutePattern;
use std::collections::HashMap;

use super::error::{Errors, Pos};
use super::file::{RawCapability, RawPolicy};
use super::model::{
    AgentDef, CapabilityDef, CredentialDef, HostPattern, Injection, Policy, Scheme, ServiceDef,
};
use super::service::{RawInjectKind, RawService};
use super::values;
use super::yaml::Located;

/// Checks `raw` and builds the policy. `None` means problems were reported to `errs` (and some
/// may have been reported by stage one: the caller must look at `errs` either way).
pub(crate) fn check(raw: RawPolicy, version: String, errs: &mut Errors) -> Option<Policy> {
    let credential_ix = index(raw.credentials.iter().map(|c| &c.name.value));
    let service_ix = index(raw.services.iter().map(|s| &s.name.value));
    let capability_ix = index(raw.capabilities.iter().map(|c| &c.name.value));

    let services: Vec<Option<ServiceDef>> = raw
        .services
        .iter()
        .map(|s| check_service(s, &credential_ix, errs))
        .collect();
    let capabilities: Vec<Option<CapabilityDef>> = raw
        .capabilities
        .iter()
        .map(|c| check_capability(c, &service_ix, errs))
        .collect();
    check_shared_hosts(&raw.services, &raw.capabilities, &service_ix, errs);
    check_passthrough(&raw.passthrough, &raw.services, errs);

    let mut agents = Vec::with_capacity(raw.agents.len());
    for agent in &raw.agents {
        let mut granted = Vec::with_capacity(agent.capabilities.len());
        let mut seen: HashMap<&str, Pos> = HashMap::new();
        for cap in &agent.capabilities {
            if let Some(first) = seen.insert(&cap.value, cap.pos) {
                errs.push(
                    cap.pos,
                    &cap.path,
                    format!("capability `{}` is already listed at {first}", cap.value),
                );
            }
            match capability_ix.get(cap.value.as_str()) {
                Some(&i) => granted.push(i),
                None => undefined(errs, cap, "capability", capability_ix.keys()),
            }
        }
        if let Some(owner) = &agent.owner {
            agents.push(AgentDef {
                name: agent.name.value.clone(),
                owner: owner.clone(),
                capabilities: granted,
                max_ttl: agent.max_ttl,
            });
        }
    }

    let credentials: Vec<CredentialDef> = raw
        .credentials
        .into_iter()
        .filter_map(|c| {
            let (source, refresh) = c.source?;
            Some(CredentialDef {
                name: c.name.value,
                source,
                refresh,
            })
        })
        .collect();

    if !errs.is_empty() {
        return None;
    }
    Some(Policy {
        version,
        proxy: raw.proxy,
        admin: raw.admin?,
        ca: raw.ca,
        audit: raw.audit,
        credentials,
        services: services.into_iter().collect::<Option<Vec<_>>>()?,
        capabilities: capabilities.into_iter().collect::<Option<Vec<_>>>()?,
        agents,
        passthrough: raw.passthrough.into_iter().map(|h| h.value).collect(),
    })
}

fn index<'a>(names: impl Iterator<Item = &'a String>) -> HashMap<&'a str, usize> {
    let mut map = HashMap::new();
    for (i, name) in names.enumerate() {
        map.entry(name.as_str()).or_insert(i);
    }
    map
}

/// "undefined credential `x`", with the nearest defined name when one is close.
fn undefined<'a>(
    errs: &mut Errors,
    name: &Located<String>,
    what: &str,
    defined: impl Iterator<Item = &'a &'a str>,
) {
    // SECURITY: `credential: ghp_...` (the token pasted where its name goes) is the likeliest
    // way a secret reaches this file; such a "name" is not repeated.
    if values::looks_like_secret(&name.value) {
        errs.push(
            name.pos,
            &name.path,
            format!(
                "undefined {what} (not repeated: it looks like a secret, not the name of a {what})"
            ),
        );
        return;
    }
    let mut defined: Vec<&str> = defined.copied().collect();
    defined.sort_unstable();
    let hint = match defined.as_slice() {
        [] => format!("; no {what} is defined"),
        list => match list.iter().find(|d| near(d, &name.value)) {
            Some(d) => format!("; did you mean `{d}`?"),
            None => String::new(),
        },
    };
    errs.push(
        name.pos,
        &name.path,
        format!("undefined {what} `{}`{hint}", name.value),
    );
}

/// Same name but for case, or one character added, dropped or changed.
fn near(a: &str, b: &str) -> bool {
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    if long.len() - short.len() > 1 {
        return false;
    }
    let prefix = short
        .bytes()
        .zip(long.bytes())
        .take_while(|(x, y)| x == y)
        .count();
    let tail_short = short.get(prefix..).unwrap_or("");
    let tail_long = long.get(prefix..).unwrap_or("");
    tail_long.get(1..) == Some(tail_short) || tail_short.get(1..) == tail_long.get(1..)
}

fn check_service(
    s: &RawService,
    credential_ix: &HashMap<&str, usize>,
    errs: &mut Errors,
) -> Option<ServiceDef> {
    let mut seen: HashMap<&HostPattern, Pos> = HashMap::new();
    for host in &s.hosts {
        if let Some(first) = seen.get(&host.value) {
            errs.push(
                host.pos,
                &host.path,
                format!("this host is already listed at {first}"),
            );
        } else {
            seen.insert(&host.value, host.pos);
        }
    }
    match (&s.ca_file, s.scheme) {
        (Some(ca), Scheme::Http) => {
            errs.push(ca.pos, &ca.path, "`tls` applies only to `scheme: https`");
        }
        // Read now, so `check` refuses what `serve` and reload would (with a position).
        (Some(ca), Scheme::Https) => {
            if let Err(e) = crate::tls::upstream::check_ca_file(&ca.value) {
                errs.push(ca.pos, &ca.path, e.to_string());
            }
        }
        (None, _) => {}
    }
    let mut inject = None;
    if let Some(raw) = &s.inject {
        // SECURITY: over plain HTTP the injected secret crosses the network readable by anyone
        // on the path; the operator has to say so explicitly.
        if s.scheme == Scheme::Http && !s.allow_cleartext {
            errs.push(
                raw.pos,
                &raw.path,
                "this service uses `scheme: http`, so its credential would cross the network in the clear; set `allow_cleartext: true` to accept that, or use https",
            );
        }
        let credential = match &raw.credential {
            Some(name) => match credential_ix.get(name.value.as_str()) {
                Some(&i) => Some(i),
                None => {
                    undefined(errs, name, "credential", credential_ix.keys());
                    None
                }
            },
            None => None,
        };
        inject = match (&raw.kind, credential) {
            (
                Some(RawInjectKind::Header {
                    name,
                    prefix,
                    suffix,
                }),
                Some(credential),
            ) => Some(Injection::Header {
                name: name.clone(),
                prefix: prefix.clone(),
                suffix: suffix.clone(),
                credential,
            }),
            (Some(RawInjectKind::Query { param }), Some(credential)) => Some(Injection::Query {
                param: param.clone(),
                credential,
            }),
            (Some(RawInjectKind::Basic { username }), Some(credential)) => Some(Injection::Basic {
                username: username.clone(),
                credential,
            }),
            _ => return None,
        };
    }
    if s.hosts.is_empty() {
        return None;
    }
    Some(ServiceDef {
        name: s.name.value.clone(),
        hosts: s.hosts.iter().map(|h| h.value.clone()).collect(),
        scheme: s.scheme,
        port: s.port,
        connect_to: s.connect_to.clone(),
        ca_file: s.ca_file.as_ref().map(|c| c.value.clone()),
        inject,
        allow_cleartext: s.allow_cleartext,
    })
}

fn check_capability(
    c: &RawCapability,
    service_ix: &HashMap<&str, usize>,
    errs: &mut Errors,
) -> Option<CapabilityDef> {
    let mut seen: HashMap<&RoutePattern, Pos> = HashMap::new();
    for route in &c.routes {
        if let Some(first) = seen.get(&route.value) {
            errs.push(
                route.pos,
                &route.path,
                format!("this route is already listed at {first}"),
            );
        } else {
            seen.insert(&route.value, route.pos);
        }
    }
    let name = c.service.as_ref()?;
    let Some(&service) = service_ix.get(name.value.as_str()) else {
        undefined(errs, name, "service", service_ix.keys());
        return None;
    };
    if c.routes.is_empty() {
        return None;
    }
    Some(CapabilityDef {
        name: c.name.value.clone(),
        service,
        risk: c.risk,
        routes: c.routes.iter().map(|r| r.value.clone()).collect(),
        route_text: c.routes.iter().map(|r| r.value.to_string()).collect(),
    })
}

/// SPEC §3: two services that share a host (and scheme and port) must not have routes that can
/// match the same request — which credential to inject would be ambiguous, and ambiguity fails
/// closed. Services of different schemes never see the same request (a CONNECT or an
/// `https://` URI reaches only `https` services, an `http://` URI only `http` ones), so they
/// may share a host and port. Each clash is reported once, at whichever of the two routes is
/// written later.
fn check_shared_hosts(
    services: &[RawService],
    capabilities: &[RawCapability],
    service_ix: &HashMap<&str, usize>,
    errs: &mut Errors,
) {
    let service_of = |c: &RawCapability| {
        c.service
            .as_ref()
            .and_then(|s| service_ix.get(s.value.as_str()).copied())
    };
    for (a, sa) in services.iter().enumerate() {
        for (b, sb) in services.iter().enumerate().skip(a + 1) {
            if sa.scheme != sb.scheme || sa.port != sb.port || !shares_a_host(sa, sb) {
                continue;
            }
            // `b`'s routes indexed once, each of `a`'s looked up: not every pair compared.
            let mut index = OverlapIndex::new();
            for (ci, cb) in capabilities.iter().enumerate() {
                if service_of(cb) == Some(b) {
                    for (ri, rb) in cb.routes.iter().enumerate() {
                        index.insert(&rb.value, (ci, ri));
                    }
                }
            }
            let mut found = Vec::new();
            for ca in capabilities.iter().filter(|c| service_of(c) == Some(a)) {
                for ra in &ca.routes {
                    found.clear();
                    index.candidates(&ra.value, &mut found);
                    // In written order (the index's walk is a hash map's): the same errors
                    // in the same order on every run.
                    found.sort_unstable();
                    for &(ci, ri) in &found {
                        let Some(cb) = capabilities.get(ci) else {
                            continue;
                        };
                        let Some(rb) = cb.routes.get(ri) else {
                            continue;
                        };
                        if ra.value.overlaps(&rb.value) {
                            report_overlap((ca, ra, sa), (cb, rb, sb), errs);
                        }
                    }
                }
            }
        }
    }
}

fn shares_a_host(a: &RawService, b: &RawService) -> bool {
    a.hosts
        .iter()
        .any(|x| b.hosts.iter().any(|y| x.value.shares_host_with(&y.value)))
}

type RouteOf<'a> = (&'a RawCapability, &'a Located<RoutePattern>, &'a RawService);

/// Reports a clash once, at whichever of the two routes is written later.
fn report_overlap(a: RouteOf<'_>, b: RouteOf<'_>, errs: &mut Errors) {
    let ((_, later, this_svc), (other_cap, earlier, other_svc)) =
        if a.1.pos > b.1.pos { (a, b) } else { (b, a) };
    errs.push(
        later.pos,
        &later.path,
        format!(
            "a request can match both this route and `{}` of capability `{}` ({}); services `{}` and `{}` share a host and port, so which credential applies would be ambiguous",
            earlier.value, other_cap.name.value, earlier.pos, this_svc.name.value, other_svc.name.value
        ),
    );
}

/// A passthrough host is tunnelled blind; a service host is inspected and gets a credential.
/// One host cannot be both.
fn check_passthrough(
    passthrough: &[Located<HostPattern>],
    services: &[RawService],
    errs: &mut Errors,
) {
    let mut seen: HashMap<&HostPattern, Pos> = HashMap::new();
    for host in passthrough {
        if let Some(first) = seen.get(&host.value) {
            errs.push(
                host.pos,
                &host.path,
                format!("this host is already listed at {first}"),
            );
        } else {
            seen.insert(&host.value, host.pos);
        }
        for s in services {
            if let Some(served) = s
                .hosts
                .iter()
                .find(|h| h.value.shares_host_with(&host.value))
            {
                errs.push(
                    host.pos,
                    &host.path,
                    format!(
                        "service `{}` serves this host too ({}); a host is either inspected by a service or tunnelled blind, not both",
                        s.name.value, served.pos
                    ),
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::{errors, ADMIN};

    #[test]
    fn undefined_references() {
        let text = format!(
            "{ADMIN}\
credentials:
  github_token: {{source: env:GITHUB_TOKEN}}
services:
  github:
    hosts: [api.github.com]
    inject: {{header: Authorization, value: 'Bearer ${{credential}}', credential: github_tokn}}
capabilities:
  read:
    service: githb
    routes: [GET /x]
agents:
  bot:
    owner: me
    capabilities: [read, write]
"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:8:80: services.github.inject.credential: undefined credential `github_tokn`; did you mean `github_token`?",
                "p.yaml:11:14: capabilities.read.service: undefined service `githb`; did you mean `github`?",
                "p.yaml:16:26: agents.bot.capabilities[1]: undefined capability `write`",
            ]
        );
    }

    #[test]
    fn bad_routes() {
        let text = format!(
            "{ADMIN}\
services:
  s: {{hosts: [a.example]}}
capabilities:
  c:
    service: s
    routes:
      - GET /ok
      - TRACE /x
      - get /x
      - GET  /x
      - GET /a//b
      - GET /ok
  empty:
    service: s
    routes: []
"
        );
        let errs = errors(&text);
        let located: Vec<&str> = errs.iter().map(|e| e.split(": ").next().unwrap()).collect();
        assert_eq!(
            located,
            [
                "p.yaml:10:9",
                "p.yaml:11:9",
                "p.yaml:12:9",
                "p.yaml:13:9",
                "p.yaml:14:9",
                "p.yaml:17:5"
            ]
        );
        assert!(
            errs[0].starts_with("p.yaml:10:9: capabilities.c.routes[1]: "),
            "{errs:?}"
        );
        assert!(errs[0].contains("TRACE"), "{errs:?}");
        assert_eq!(
            errs[4],
            "p.yaml:14:9: capabilities.c.routes[5]: this route is already listed at 9:9"
        );
        assert_eq!(
            errs[5],
            "p.yaml:17:5: capabilities.empty.routes: `routes` must list at least one route"
        );
    }

    #[test]
    fn overlapping_routes_of_services_sharing_a_host() {
        let text = format!(
            "{ADMIN}\
services:
  gh-a: {{hosts: [api.github.com]}}
  gh-b: {{hosts: ['*.github.com']}}
  gh-c: {{hosts: [api.github.com], port: 8443}}
  gh-d: {{hosts: [api.github.com], scheme: http, port: 443}}
capabilities:
  a.read:
    service: gh-a
    routes: ['GET /repos/{{owner}}/{{repo}}', POST /x]
  c.read:
    service: gh-c
    routes: ['GET /repos/{{owner}}/{{repo}}']
  d.read:
    service: gh-d
    routes: ['GET /repos/{{owner}}/{{repo}}']
  b.read:
    service: gh-b
    routes:
      - GET|HEAD /repos/acme/{{name}}
      - GET /x
"
        );
        assert_eq!(
            errors(&text),
            ["p.yaml:21:9: capabilities.b.read.routes[0]: a request can match both this route and `GET /repos/{owner}/{repo}` of capability `a.read` (11:14); services `gh-b` and `gh-a` share a host and port, so which credential applies would be ambiguous"]
        );
    }

    #[test]
    fn all_errors_at_once_sorted_by_position() {
        let text = "\
agents:
  bot: {owner: me, capabilities: [nope], max_ttl: soon}
proxy:
  listen: nope
  whatever: 1
credentials:
  k: {source: hunter2}
";
        let errs = errors(text);
        assert_eq!(
            errs,
            [
                "p.yaml:1:1: admin: required key `admin` is missing (it holds `token`, the admin API's bearer token)",
                "p.yaml:2:35: agents.bot.capabilities[0]: undefined capability `nope`; no capability is defined",
                "p.yaml:2:51: agents.bot.max_ttl: must be a duration with a unit, like `30s`, `5m` or `1h`",
                "p.yaml:4:11: proxy.listen: must be an IP address and port, like `127.0.0.1:8480` or `[::1]:8480`",
                "p.yaml:5:3: proxy.whatever: unknown key `whatever` (expected one of: listen, header_read_timeout, idle_timeout, send_timeout, max_connections, max_task_in_flight, max_task_denials_per_second, max_task_connections, max_agent_connections, max_header_bytes, connect_timeout, upstream_timeout, shutdown_timeout)",
                "p.yaml:7:15: credentials.k.source: literal secrets are not allowed; write `env:NAME`, `file:PATH` or `{exec: [command, args...]}`",
            ]
        );
        assert!(!errs.join("\n").contains("hunter2"));
    }

    #[test]
    fn near_names() {
        assert!(near("github_token", "github_tokn"));
        assert!(near("github_token", "github_tokens"));
        assert!(near("openai", "OpenAI"));
        assert!(near("abc", "abd"));
        assert!(!near("abc", "xyz"));
        assert!(!near("a", "abc"));
    }
}
