//! Stage one, services: `services.NAME` entries — hosts, scheme and port, upstream TLS, and
//! how the credential is injected — read into `RawService`s with every shape problem reported.
//!
//! Must never resolve the credential a service names (that is `check`), and never put a value
//! into a message.

use std::path::{Path, PathBuf};

use super::error::{Errors, Pos};
use super::model::{HostPattern, Scheme};
use super::values;
use super::yaml::{join, Field, Located, Map};

pub(crate) struct RawService {
    pub name: Located<String>,
    pub hosts: Vec<Located<HostPattern>>,
    pub scheme: Scheme,
    pub port: u16,
    pub connect_to: Option<(String, u16)>,
    pub ca_file: Option<Located<PathBuf>>,
    pub inject: Option<RawInjection>,
    pub allow_cleartext: bool,
}

pub(crate) enum RawInjectKind {
    Header {
        name: http::HeaderName,
        prefix: String,
        suffix: String,
    },
    Query {
        param: String,
    },
    Basic {
        username: String,
    },
}

pub(crate) struct RawInjection {
    /// `None` when the kind's own keys were invalid (already reported).
    pub kind: Option<RawInjectKind>,
    pub credential: Option<Located<String>>,
    /// The `inject` key, for problems with the injection as a whole.
    pub pos: Pos,
    pub path: String,
}

pub(crate) fn read_service(
    name: Located<String>,
    field: Field<'_>,
    base_dir: &Path,
    errs: &mut Errors,
) -> Option<RawService> {
    const KEYS: &[&str] = &[
        "hosts",
        "scheme",
        "port",
        "connect_to",
        "tls",
        "inject",
        "allow_cleartext",
    ];
    // A broken entry still defines its name, so references to it are not reported as well.
    let Some(map) = Map::open(errs, field, KEYS) else {
        return Some(RawService {
            name,
            hosts: Vec::new(),
            scheme: Scheme::Https,
            port: Scheme::Https.default_port(),
            connect_to: None,
            ca_file: None,
            inject: None,
            allow_cleartext: false,
        });
    };
    let hosts = match map.require(errs, "hosts") {
        Some(f) => {
            let hosts = host_list(f, errs);
            if f.node.as_sequence().is_some_and(|s| s.is_empty()) {
                errs.push(f.key_pos, f.path, "`hosts` must list at least one host");
            }
            hosts
        }
        None => Vec::new(),
    };
    let scheme = match map.get("scheme") {
        None => Scheme::Https,
        Some(f) => match f.node.as_scalar().map(|s| s.as_str()) {
            Some("https") => Scheme::Https,
            Some("http") => Scheme::Http,
            _ => {
                errs.push(f.pos(), f.path, "must be `https` or `http`");
                Scheme::Https
            }
        },
    };
    let port = map
        .get("port")
        .and_then(|f| f.integer(errs, 1, u64::from(u16::MAX)))
        .and_then(|p| u16::try_from(p).ok())
        .unwrap_or(scheme.default_port());
    let connect_to = map.get("connect_to").and_then(|f| {
        let text = f.string(errs)?;
        values::parse_authority(&text.value)
            .map_err(|why| errs.push(f.pos(), f.path, why))
            .ok()
    });
    let ca_file = map.get("tls").and_then(|f| {
        let tls = Map::open(errs, f, &["ca_file"])?;
        let ca = tls.require(errs, "ca_file")?;
        let path = ca.string(errs)?;
        Some(Located {
            value: base_dir.join(path.value),
            pos: ca.pos(),
            path: ca.path.to_owned(),
        })
    });
    let inject = map.get("inject").and_then(|f| read_injection(f, errs));
    let allow_cleartext = map
        .get("allow_cleartext")
        .and_then(|f| f.bool(errs))
        .unwrap_or(false);
    Some(RawService {
        name,
        hosts,
        scheme,
        port,
        connect_to,
        ca_file,
        inject,
        allow_cleartext,
    })
}

pub(crate) fn host_list(field: Field<'_>, errs: &mut Errors) -> Vec<Located<HostPattern>> {
    let Some(items) = field.items(errs) else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for (i, pos, node) in items {
        let path = format!("{}[{i}]", field.path);
        let item = Field {
            node,
            key_pos: pos,
            path: &path,
        };
        let Some(text) = item.string(errs) else {
            continue;
        };
        match values::parse_host_pattern(&text.value) {
            Ok(host) => out.push(Located {
                value: host,
                pos,
                path,
            }),
            Err(why) => errs.push(pos, &path, why),
        }
    }
    out
}

fn read_injection(field: Field<'_>, errs: &mut Errors) -> Option<RawInjection> {
    let map = Map::open(
        errs,
        field,
        &["header", "value", "query", "basic", "credential"],
    )?;
    let kinds: Vec<Field<'_>> = ["header", "query", "basic"]
        .iter()
        .filter_map(|k| map.get(k))
        .collect();
    let mut kind = None;
    match kinds.as_slice() {
        [] => errs.push(
            field.key_pos,
            field.path,
            "`inject` needs one of `header` (with `value`), `query` or `basic`",
        ),
        [only] => kind = read_inject_kind(&map, *only, errs),
        [_, extra, ..] => errs.push(
            extra.key_pos,
            extra.path,
            "`inject` takes only one of `header`, `query` or `basic`",
        ),
    }
    if let (Some(value), false) = (map.get("value"), map.has("header")) {
        errs.push(
            value.key_pos,
            value.path,
            "`value` goes with `header`; `query` and `basic` take the secret as it is",
        );
    }
    let credential = map.require(errs, "credential").and_then(|f| f.string(errs));
    Some(RawInjection {
        kind,
        credential,
        pos: field.key_pos,
        path: field.path.to_owned(),
    })
}

fn read_inject_kind(map: &Map<'_>, kind: Field<'_>, errs: &mut Errors) -> Option<RawInjectKind> {
    let report = |errs: &mut Errors, f: &Field<'_>, why: String| errs.push(f.pos(), f.path, why);
    match kind.key() {
        "header" => {
            let header = kind.string(errs);
            let value = map.require(errs, "value").and_then(|f| {
                let text = f.string(errs)?;
                values::split_template(&text.value)
                    .map_err(|why| report(errs, &f, why))
                    .ok()
            });
            let name = values::check_inject_header(&header?.value)
                .map_err(|why| report(errs, &kind, why))
                .ok()?;
            let (prefix, suffix) = value?;
            Some(RawInjectKind::Header {
                name,
                prefix,
                suffix,
            })
        }
        "query" => {
            let param = kind.string(errs)?.value;
            values::check_query_param(&param)
                .map_err(|why| report(errs, &kind, why))
                .ok()?;
            Some(RawInjectKind::Query { param })
        }
        _ => {
            let basic = Map::open(errs, kind, &["username"])?;
            let Some(user) = basic.get("username") else {
                errs.push(
                    basic.pos,
                    &join(kind.path, "username"),
                    "required key `username` is missing (write `username: \"\"` for none)",
                );
                return None;
            };
            let Some(username) = user.node.as_scalar().map(|s| s.as_str().to_owned()) else {
                errs.push(user.key_pos, user.path, "expected a string");
                return None;
            };
            values::check_basic_username(&username)
                .map_err(|why| report(errs, &user, why))
                .ok()?;
            Some(RawInjectKind::Basic { username })
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::policy::testing::{errors, ok, ADMIN};
    use crate::policy::Injection;

    #[test]
    fn basic_injection_usernames() {
        let svc = |inject: &str| {
            format!("{ADMIN}credentials: {{k: {{source: env:K}}}}\nservices:\n  s:\n    hosts: [s.example]\n    inject: {inject}\n")
        };
        let p = ok(&svc("{basic: {username: ''}, credential: k}"));
        assert_eq!(
            p.services[0].inject,
            Some(Injection::Basic {
                username: String::new(),
                credential: 0
            })
        );
        assert_eq!(
            errors(&svc("{basic: {username: 'a:b'}, credential: k}")),
            ["p.yaml:7:32: services.s.inject.basic.username: a basic-auth username must not contain `:` or control characters"]
        );
        assert_eq!(
            errors(&svc("{basic: {}, credential: k}")),
            ["p.yaml:7:14: services.s.inject.basic.username: required key `username` is missing (write `username: \"\"` for none)"]
        );
        assert_eq!(
            errors(&svc("{basic: {username: [x]}, credential: k}")),
            ["p.yaml:7:22: services.s.inject.basic.username: expected a string"]
        );
        assert_eq!(
            errors(&svc("{credential: k}")),
            ["p.yaml:7:5: services.s.inject: `inject` needs one of `header` (with `value`), `query` or `basic`"]
        );
    }

    #[test]
    fn an_unusable_ca_file_is_refused_where_it_is_named() {
        let text = format!(
            "{ADMIN}services:\n  internal:\n    hosts: [i.example]\n    tls: {{ca_file: missing-ca.pem}}\n"
        );
        let errs = errors(&text);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with(
                "p.yaml:6:20: services.internal.tls.ca_file: cannot read `/etc/keyward/missing-ca.pem`"
            ),
            "{errs:?}"
        );
    }

    #[test]
    fn service_rules() {
        let text = format!(
            "{ADMIN}\
credentials:
  k: {{source: env:K}}
services:
  clear:
    hosts: [a.example, A.example.]
    scheme: http
    tls: {{ca_file: ca.pem}}
    inject: {{query: key, credential: k}}
  nohosts: {{hosts: []}}
  badhost: {{hosts: ['https://x.example', '*.com'], scheme: ftp}}
  twokinds:
    hosts: [t.example]
    inject: {{header: X-Key, query: key, credential: k}}
  badheader:
    hosts: [h.example]
    inject: {{header: Host, value: 'x', credential: k}}
  noval:
    hosts: [v.example]
    connect_to: nowhere
    inject: {{query: k, value: 'x${{credential}}', credential: k}}
passthrough: [a.example, v.example, z.example, z.example]
"
        );
        assert_eq!(
            errors(&text),
            [
                "p.yaml:7:24: services.clear.hosts[1]: this host is already listed at 7:13",
                "p.yaml:9:20: services.clear.tls.ca_file: `tls` applies only to `scheme: https`",
                "p.yaml:10:5: services.clear.inject: this service uses `scheme: http`, so its credential would cross the network in the clear; set `allow_cleartext: true` to accept that, or use https",
                "p.yaml:11:13: services.nohosts.hosts: `hosts` must list at least one host",
                "p.yaml:12:21: services.badhost.hosts[0]: a host must not contain a scheme or a path; write the bare name (`api.example.com`)",
                "p.yaml:12:42: services.badhost.hosts[1]: a wildcard must cover a name with at least two labels (`*.example.com`)",
                "p.yaml:12:60: services.badhost.scheme: must be `https` or `http`",
                "p.yaml:15:29: services.twokinds.inject.query: `inject` takes only one of `header`, `query` or `basic`",
                "p.yaml:18:22: services.badheader.inject.header: keyward cannot inject `host`: it is a hop-by-hop or framing header",
                "p.yaml:18:35: services.badheader.inject.value: `value` must contain `${credential}` where the secret goes",
                "p.yaml:21:17: services.noval.connect_to: must be `HOST:PORT`, like `127.0.0.1:9443` or `[::1]:9443`",
                "p.yaml:22:24: services.noval.inject.value: `value` goes with `header`; `query` and `basic` take the secret as it is",
                "p.yaml:23:15: passthrough[0]: service `clear` serves this host too (7:13); a host is either inspected by a service or tunnelled blind, not both",
                "p.yaml:23:26: passthrough[1]: service `noval` serves this host too (20:13); a host is either inspected by a service or tunnelled blind, not both",
                "p.yaml:23:48: passthrough[3]: this host is already listed at 23:37",
            ]
        );
    }
}
