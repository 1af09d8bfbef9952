//! Writes a generated benchmark policy (see `benches/support/gen_policy.rs` for its shape) and
//! checks it with `keyward::policy::parse` before writing.
//!
//! ```sh
//! cargo run --release --example gen_policy -- --capabilities 1000 --routes 10000 --out /tmp/p.yaml
//! # the policy the shared harness runs (benches/harness/candidate.sh):
//! cargo run --release --example gen_policy -- --capabilities 1000 --routes 10000 \
//!     --harness --listen 127.0.0.1:14000 --admin 127.0.0.1:14001 --ca-cert CA.pem --ca-key CA.key \
//!     --audit /tmp/audit.jsonl --origin-host localhost --origin-https-port 18443 \
//!     --origin-http-port 18080 --origin-ca ORIGIN_CA.pem --passthrough 127.0.0.1 --out /tmp/p.yaml
//! ```
//!
//! Prints one line to stderr: capabilities, routes, services, agents, and the credential
//! variables the policy reads (`KW_BENCH_KEY_<i>`), which `serve` needs in its environment.

#[path = "../benches/support/gen_policy.rs"]
mod gen_policy;

use std::path::Path;
use std::process::ExitCode;

use gen_policy::{generate, Harness, Spec};

fn usage() -> ExitCode {
    eprintln!(
        "usage: gen_policy [--capabilities N] [--routes N] [--services N] [--agents N] --out FILE\n\
         \x20      [--harness --listen ADDR --admin ADDR --ca-cert F --ca-key F --audit F\n\
         \x20       --origin-host H --origin-https-port P --origin-http-port P --origin-ca F\n\
         \x20       [--passthrough HOST]...]"
    );
    ExitCode::from(1)
}

/// The harness setting a string flag sets.
fn string_field<'a>(h: &'a mut Harness, flag: &str) -> Option<&'a mut String> {
    Some(match flag {
        "--listen" => &mut h.proxy_listen,
        "--admin" => &mut h.admin_listen,
        "--ca-cert" => &mut h.ca_cert,
        "--ca-key" => &mut h.ca_key,
        "--audit" => &mut h.audit,
        "--origin-host" => &mut h.origin_host,
        "--origin-ca" => &mut h.origin_ca,
        _ => return None,
    })
}

fn main() -> ExitCode {
    let mut spec = Spec::large();
    let mut out = None;
    let mut harness = false;
    let mut h = Harness {
        proxy_listen: "127.0.0.1:8480".into(),
        admin_listen: "127.0.0.1:8481".into(),
        ca_cert: "certs/ca.pem".into(),
        ca_key: "certs/ca-key.pem".into(),
        audit: "audit.jsonl".into(),
        origin_host: "localhost".into(),
        origin_https_port: 18443,
        origin_http_port: 18080,
        origin_ca: "origin-ca.pem".into(),
        passthrough: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        if flag == "--harness" {
            harness = true;
            continue;
        }
        let Some(value) = args.next() else {
            return usage();
        };
        let number = value.parse::<usize>().ok();
        let port = value.parse::<u16>().ok();
        let text = value.clone();
        let ok = match flag.as_str() {
            "--capabilities" => number.map(|n| spec.capabilities = n).is_some(),
            "--routes" => number.map(|n| spec.routes = n).is_some(),
            "--services" => number.map(|n| spec.services = n).is_some(),
            "--agents" => number.map(|n| spec.agents = n).is_some(),
            "--origin-https-port" => port.map(|p| h.origin_https_port = p).is_some(),
            "--origin-http-port" => port.map(|p| h.origin_http_port = p).is_some(),
            "--out" => {
                out = Some(text);
                true
            }
            "--passthrough" => {
                h.passthrough.push(text);
                true
            }
            other => match string_field(&mut h, other) {
                Some(field) => {
                    *field = text;
                    true
                }
                None => false,
            },
        };
        if !ok {
            eprintln!("gen_policy: bad flag or value: {flag} {value}");
            return usage();
        }
    }
    let Some(out) = out else { return usage() };
    let min_caps = if harness { 3 } else { 1 };
    if spec.capabilities < min_caps || spec.services == 0 || spec.routes < spec.capabilities {
        eprintln!(
            "gen_policy: need capabilities >= {min_caps}, services >= 1, routes >= capabilities"
        );
        return ExitCode::from(1);
    }
    if harness {
        spec.harness = Some(h);
    }
    let generated = generate(&spec);
    let dir = Path::new(&out)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Err(errors) = keyward::policy::parse(&out, &generated.yaml, dir) {
        eprintln!("gen_policy: the generated policy is invalid (a generator bug):\n{errors}");
        return ExitCode::from(2);
    }
    if let Err(e) = std::fs::write(&out, &generated.yaml) {
        eprintln!("gen_policy: cannot write {out}: {e}");
        return ExitCode::from(1);
    }
    eprintln!(
        "gen_policy: wrote {out}: {} capabilities, {} routes, {} services, {} agents; credentials from {}",
        generated.capabilities.len(),
        generated.route_count,
        generated.credential_envs.len(),
        generated.agents.len(),
        generated.credential_envs.join(" "),
    );
    ExitCode::SUCCESS
}
