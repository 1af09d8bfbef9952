//! The `keyward` binary (SPEC §6): `check` on the shipped policies and on broken ones (every
//! error as `file:line:column: key.path: message`), `explain` (the decision without sending
//! anything, never a secret), and `serve` (the listening line once bound; SIGTERM exits 0).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

use common::{assert_absent, bounded};
use tokio::io::{AsyncBufReadExt, BufReader};

const BIN: &str = env!("CARGO_BIN_EXE_keyward");

/// Runs the binary to completion (bounded) with a clean environment for keyward's variables.
async fn keyward(args: &[&str]) -> Output {
    let out = tokio::process::Command::new(BIN)
        .args(args)
        .env_remove("KEYWARD_ADMIN_TOKEN")
        .env("RUST_LOG", "info")
        .kill_on_drop(true)
        .output();
    bounded(&format!("keyward {args:?}"), out).await.unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// 1-based line number of the first line containing `marker`.
fn line_of(yaml: &str, marker: &str) -> usize {
    yaml.lines()
        .position(|l| l.contains(marker))
        .unwrap_or_else(|| panic!("`{marker}` is not in the policy"))
        + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_accepts_every_shipped_example_policy() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("policy");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(
        !files.is_empty(),
        "no example policies in {}",
        dir.display()
    );
    for file in files {
        let out = keyward(&["check", "--config", file.to_str().unwrap()]).await;
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}:\n{}{}",
            file.display(),
            text(&out.stdout),
            text(&out.stderr)
        );
    }
}

/// What is valid but probably a mistake is said on stderr, and `check` still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_warns_about_what_cannot_be_used() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    let policy = std::fs::read_to_string(&file)
        .unwrap()
        .replace(
            "  api_token: { source: file:api-token }\n",
            "  api_token: { source: file:api-token }\n  spare: { source: env:SPARE }\n",
        )
        .replace(
            "services:\n",
            "services:\n  lonely:\n    hosts: [lonely.test]\n",
        )
        .replace("    risk: medium\n", "    risk: high\n");
    std::fs::write(&file, policy).unwrap();
    let out = keyward(&["check", "--config", file.to_str().unwrap()]).await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    for want in [
        "warning: service `lonely` has no capability",
        "warning: credential `spare` is injected by no service",
        "warning: capability `api.issues.write` is high-risk: every request for it is denied `approval_required`",
    ] {
        assert!(stderr.contains(want), "{want:?} not in:\n{stderr}");
    }
    let warnings = stderr.lines().filter(|l| l.contains(": warning: ")).count();
    assert_eq!(warnings, 3, "{stderr}");
}

/// `check` looks at the CA as `serve` would load it, so a broken one fails before a start:
/// missing files are only noted (`serve` creates them), a key others can read or a key
/// without its certificate are errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_checks_the_ca_files_as_serve_would_load_them() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    let args = ["check", "--config", file.to_str().unwrap()];
    let check = || keyward(&args);
    let out = check().await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("note: the CA files do not exist yet"),
        "{stderr}"
    );

    let init = keyward(&["ca", "init", "--dir", dir.path().to_str().unwrap()]).await;
    assert_eq!(init.status.code(), Some(0), "{}", text(&init.stderr));
    let out = check().await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("note:"),
        "{}",
        text(&out.stderr)
    );

    let key = dir.path().join("ca-key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check().await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(": ca: ") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    assert!(!text(&out.stdout).contains(": ok"), "{}", text(&out.stdout));

    std::fs::remove_file(&key).unwrap();
    let out = check().await;
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("exists but its key"), "{stderr}");
}

/// A policy with several independent errors, each on a line marked for the test.
const BROKEN: &str = r#"proxy:
  listen: 127.0.0.1:0
  surprise_option: 1
admin:
  listen: 127.0.0.1:0
  token: sk_literal_admin_value_zq9
ca: { cert: ca.pem, key: ca-key.pem }
audit: { path: audit.jsonl }
credentials:
  api_token: { source: file:api-token }
services:
  api:
    hosts: [api.test]
    tls: { ca_file: no-such-upstream-ca.pem }
    inject: { header: Authorization, value: "Bearer ${credential}", credential: missing_cred }
  clear:
    hosts: [clear.test]
    scheme: http
    inject: { header: Authorization, value: "Bearer ${credential}", credential: api_token }
capabilities:
  api.read:
    service: api
    risk: extreme
    routes:
      - GET /v1/things/{id}
  api.trace:
    service: api
    risk: low
    routes:
      - TRACE /v1/debug
  clear.read:
    service: no_such_service
    risk: low
    routes:
      - GET /x
agents:
  bot:
    owner: tests
    capabilities: [api.read, no.such.capability]
    max_ttl: 1h
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_error_as_file_line_column_key_path_message() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, BROKEN).unwrap();
    let path = file.to_str().unwrap();
    let out = keyward(&["check", "--config", path]).await;
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    // Errors go to stderr (SPEC §6).
    assert_eq!(stdout, "", "{stderr}");

    let errors: Vec<(usize, usize, String)> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{path}:")))
        .map(|rest| {
            let mut parts = rest.splitn(3, ':');
            let line = parts
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("line in {rest}"));
            let col = parts
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("column in {rest}"));
            (line, col, parts.next().unwrap().trim().to_string())
        })
        .collect();
    // (marker on the offending line, key path the message must name)
    let expected = [
        ("surprise_option", "proxy.surprise_option"),
        ("sk_literal_admin_value_zq9", "admin.token"),
        (
            "ca_file: no-such-upstream-ca.pem",
            "services.api.tls.ca_file",
        ),
        ("credential: missing_cred", "services.api.inject"),
        ("credential: api_token }", "services.clear.inject"),
        ("risk: extreme", "capabilities.api.read.risk"),
        ("TRACE /v1/debug", "capabilities.api.trace.routes"),
        (
            "service: no_such_service",
            "capabilities.clear.read.service",
        ),
        (
            "capabilities: [api.read, no.such.capability]",
            "agents.bot.capabilities",
        ),
    ];
    for (marker, key) in expected {
        let line = line_of(BROKEN, marker);
        assert!(
            errors.iter().any(|(l, c, msg)| *l == line
                && *c >= 1
                && msg.starts_with(key)
                && msg[key.len()..].contains(": ")),
            "no `{path}:{line}:COL: {key}...: message` for `{marker}` in:\n{stdout}{stderr}"
        );
    }
    assert_eq!(
        errors.len(),
        expected.len(),
        "one line per error:\n{stdout}{stderr}"
    );
    // And nothing else (but the log lines RUST_LOG=info asked for, which start with their
    // timestamp): a script may read every line as an error.
    assert_eq!(
        stderr
            .lines()
            .filter(|l| !l.starts_with(|c: char| c.is_ascii_digit()))
            .count(),
        errors.len(),
        "stderr holds only the errors:\n{stderr}"
    );
    // SECURITY: a value is never echoed in an error, a would-be secret least of all.
    assert_absent(
        "sk_literal_admin_value_zq9",
        "keyward check output",
        &format!("{stdout}{stderr}"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_on_a_missing_file_exits_1_with_one_sentence() {
    let out = keyward(&["check", "--config", "/nonexistent/keyward/policy.yaml"]).await;
    assert_eq!(out.status.code(), Some(1));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(all.contains("/nonexistent/keyward/policy.yaml"), "{all}");
    assert!(!all.contains("panicked"), "{all}");
}

#[tokio::test]
async fn usage_mistakes_exit_1_and_help_exits_0() {
    // (arguments, what the one sentence must name)
    for (args, names) in [
        (&[][..], "serve, check, explain, task"),
        (&["task"][..], "mint, list, revoke"),
        (&["bogus"][..], "'bogus'"),
        (&["check"][..], "--config"),
        (&["check", "--config", "x.yaml", "--nope"][..], "'--nope'"),
        (&["task", "mint", "--agent", "a"][..], "--intent"),
    ] {
        let out = keyward(args).await;
        assert_eq!(out.status.code(), Some(1), "keyward {args:?}");
        let stderr = text(&out.stderr);
        // SPEC §6: one clear sentence, on one line.
        assert_eq!(stderr.lines().count(), 1, "keyward {args:?}:\n{stderr}");
        assert!(
            stderr.starts_with("keyward: ") && stderr.contains(names),
            "keyward {args:?}: {stderr}"
        );
    }
    for args in [
        &["--help"][..],
        &["check", "--help"][..],
        &["--version"][..],
    ] {
        let out = keyward(args).await;
        assert_eq!(out.status.code(), Some(0), "keyward {args:?}");
        assert!(
            !text(&out.stdout).is_empty(),
            "keyward {args:?} prints on stdout"
        );
    }
}

/// A port already taken: `serve` says which setting names it, and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_names_the_listen_setting_whose_port_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let policy = std::fs::read_to_string(&file).unwrap();
    for setting in ["proxy", "admin"] {
        let edited = policy.replacen(
            &format!("{setting}: {{ listen: 127.0.0.1:0"),
            &format!("{setting}: {{ listen: 127.0.0.1:{port}"),
            1,
        );
        assert_ne!(edited, policy);
        std::fs::write(&file, edited).unwrap();
        let out = keyward(&["serve", "--config", file.to_str().unwrap()]).await;
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "cannot listen on 127.0.0.1:{port} (`{setting}.listen`)"
            )),
            "{stderr}"
        );
    }
}

/// A small valid policy with file credentials (their values are secrets to look for).
fn explain_policy(dir: &Path) -> (PathBuf, Vec<String>) {
    let secrets = vec![
        format!("sk_live_explain_{}", keyward::tasks::random_hex(8)),
        format!("adm_{}", keyward::tasks::random_hex(8)),
    ];
    std::fs::write(dir.join("api-token"), &secrets[0]).unwrap();
    std::fs::write(dir.join("admin-token"), &secrets[1]).unwrap();
    let policy = r#"
proxy: { listen: 127.0.0.1:0 }
admin: { listen: 127.0.0.1:0, token: file:admin-token }
ca: { cert: ca.pem, key: ca-key.pem }
audit: { path: audit.jsonl }
credentials:
  api_token: { source: file:api-token }
services:
  api:
    hosts: [api.test]
    inject: { header: Authorization, value: "Bearer ${credential}", credential: api_token }
  search:
    hosts: [search.test]
    inject: { query: key, credential: api_token }
capabilities:
  search.read:
    service: search
    routes: [GET /v1/search]
  api.issues.read:
    service: api
    risk: low
    routes:
      - GET /repos/{owner}/{repo}/issues
  api.issues.write:
    service: api
    risk: medium
    routes:
      - POST /repos/{owner}/{repo}/issues
agents:
  bot: { owner: tests, capabilities: [api.issues.read, api.issues.write, search.read], max_ttl: 1h }
passthrough: [blind.test]
"#;
    let file = dir.join("policy.yaml");
    std::fs::write(&file, policy).unwrap();
    (file, secrets)
}

/// An `http` and an `https` service on one host and port never see the same request (a CONNECT
/// or an `https://` URI reaches only the `https` one), so `check` accepts them, and each
/// request is decided for, and gets the credential of, the service of its own scheme.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_and_an_https_service_may_share_a_host_and_port() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("policy.yaml");
    std::fs::write(
        &file,
        r#"
proxy: { listen: 127.0.0.1:0 }
admin: { listen: 127.0.0.1:0, token: env:KW_TEST_ADMIN }
ca: { cert: ca.pem, key: ca-key.pem }
audit: { path: audit.jsonl }
credentials:
  tls_key: { source: env:KW_TEST_TLS_KEY }
  clear_key: { source: env:KW_TEST_CLEAR_KEY }
services:
  secure:
    hosts: [api.test]
    port: 8443
    inject: { header: Authorization, value: "Bearer ${credential}", credential: tls_key }
  clear:
    hosts: [api.test]
    scheme: http
    port: 8443
    allow_cleartext: true
    inject: { header: Authorization, value: "Bearer ${credential}", credential: clear_key }
capabilities:
  secure.read: { service: secure, routes: ["GET /items/{id}"] }
  clear.read: { service: clear, routes: ["GET /items/{id}"] }
agents:
  bot: { owner: tests, capabilities: [secure.read, clear.read], max_ttl: 1h }
"#,
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let out = keyward(&["check", "--config", config]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));

    for (url, capability, credential) in [
        ("https://api.test:8443/items/1", "secure.read", "tls_key"),
        ("http://api.test:8443/items/1", "clear.read", "clear_key"),
    ] {
        let intent = "secure.read,clear.read";
        let args = [
            "explain", "--config", config, "--agent", "bot", "--intent", intent, "GET", url,
        ];
        let out = keyward(&args).await;
        let stdout = text(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
        assert!(stdout.contains("allowed"), "{url}: {stdout}");
        assert!(stdout.contains(capability), "{url}: {stdout}");
        assert!(stdout.contains(credential), "{url}: {stdout}");
    }
}

/// A constraint without a parameter name (`--where =acme`) is a usage mistake, said so before
/// anything is decided.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_refuses_a_constraint_without_a_parameter_name() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    let config = file.to_str().unwrap();
    let url = "https://api.test/repos/acme/web/issues";
    for (extra, says) in [
        (&["--where", "=acme"][..], "must be KEY=VALUE"),
        (&["--where", "acme"][..], "must be KEY=VALUE"),
    ] {
        let mut args = vec!["explain", "--config", config, "--agent", "bot"];
        args.extend_from_slice(&["--intent", "api.issues.read"]);
        args.extend_from_slice(extra);
        args.extend_from_slice(&["GET", url]);
        let out = keyward(&args).await;
        assert_eq!(out.status.code(), Some(1), "{extra:?}: {out:?}");
        let err = text(&out.stderr);
        assert!(err.contains(says), "{extra:?}: {err}");
        // (Its own log lines aside: RUST_LOG=info here.)
        let said: Vec<&str> = err.lines().filter(|l| l.starts_with("keyward: ")).collect();
        assert_eq!(said.len(), 1, "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explain_prints_decision_reason_capability_route_and_credential_name_never_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let (file, secrets) = explain_policy(dir.path());
    let config = file.to_str().unwrap();
    let explain = |method: &'static str, url: &'static str| {
        let args = [
            "explain",
            "--config",
            config,
            "--agent",
            "bot",
            "--intent",
            "api.issues.read",
            method,
            url,
        ]
        .map(str::to_string);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            keyward(&args).await
        }
    };
    let allow = explain("GET", "https://api.test/repos/acme/web/issues?state=open").await;
    let out = text(&allow.stdout);
    assert_eq!(allow.status.code(), Some(0), "{out}{}", text(&allow.stderr));
    for want in [
        "allow",
        "allowed",
        "api.issues.read",
        "GET /repos/{owner}/{repo}/issues",
        "api_token",
    ] {
        assert!(out.contains(want), "`{want}` missing from:\n{out}");
    }

    let deny = explain("POST", "https://api.test/repos/acme/web/issues").await;
    let out2 = text(&deny.stdout);
    assert_eq!(deny.status.code(), Some(0), "{out2}{}", text(&deny.stderr));
    for want in ["deny", "method_not_allowed", "api.issues.write"] {
        assert!(out2.contains(want), "`{want}` missing from:\n{out2}");
    }

    let ambiguous = explain("GET", "https://api.test/repos/acme/web/%2e%2e/issues").await;
    let out3 = text(&ambiguous.stdout);
    assert!(out3.contains("ambiguous_request"), "{out3}");
    // The URL's own checks are `serve`'s: a fragment, `_method` in the query, and an
    // authority `serve` refuses (userinfo, a port spelled with a leading zero) is a denial
    // too, not a usage error.
    for (method, url, code) in [
        (
            "GET",
            "https://api.test/repos/acme/web/issues#top",
            "fragment",
        ),
        (
            "GET",
            "https://api.test/repos/acme/web/issues?_METHOD=delete",
            "method_override",
        ),
        (
            "GET",
            "http://u:p@api.test/repos/acme/web/issues",
            "userinfo",
        ),
        (
            "GET",
            "https://api.test:0443/repos/acme/web/issues",
            "bad_port",
        ),
        ("CONNECT", "u@api.test:443", "userinfo"),
    ] {
        let run = explain(method, url).await;
        let out = text(&run.stdout);
        assert_eq!(run.status.code(), Some(0), "{url}: {}", text(&run.stderr));
        assert!(
            out.contains(&format!("reason:     ambiguous_request ({code})")),
            "{url}: {out}"
        );
    }
    // A look-alike of the injected query parameter, beside an allowed request.
    for (url, verdict) in [
        ("https://search.test/v1/search?q=x", "reason:     allowed"),
        (
            "https://search.test/v1/search?q=x&KEY=mine",
            "reason:     ambiguous_request (query_lookalike)",
        ),
    ] {
        let out = keyward(&[
            "explain",
            "--config",
            config,
            "--agent",
            "bot",
            "--intent",
            "search.read",
            "GET",
            url,
        ])
        .await;
        let stdout = text(&out.stdout);
        assert!(stdout.contains(verdict), "{url}: {stdout}");
    }

    // A broken constraint is named, with what the task allows.
    let constrained = keyward(&[
        "explain",
        "--config",
        config,
        "--agent",
        "bot",
        "--intent",
        "api.issues.read",
        "--where",
        "owner=acme",
        "--where",
        "owner=beta",
        "GET",
        "https://api.test/repos/evil/web/issues",
    ])
    .await;
    let out4 = text(&constrained.stdout);
    assert!(out4.contains("reason:     constraint_mismatch"), "{out4}");
    assert!(
        out4.contains("constraint: owner is `evil`; the task allows acme, beta"),
        "{out4}"
    );

    // As the proxy would: a passthrough host is tunnelled blind, an unknown one refused at
    // CONNECT, whatever the path.
    let tunnel = text(&explain("GET", "https://blind.test/anything").await.stdout);
    assert!(
        tunnel.contains("decision:   tunnel") && tunnel.contains("reason:     passthrough"),
        "{tunnel}"
    );
    let unknown = text(
        &explain("GET", "https://nowhere.test/repos/a/b/issues")
            .await
            .stdout,
    );
    assert!(
        unknown.contains("decision:   deny") && unknown.contains("reason:     unknown_host"),
        "{unknown}"
    );

    // CONNECT: the tunnel's own decision, as `serve` records it (it used to be decided as a
    // request for `/` and read `route_not_in_intent` for a tunnel `serve` intercepts).
    for target in ["api.test:443", "https://api.test"] {
        let connect = text(&explain("CONNECT", target).await.stdout);
        assert!(
            connect.contains("decision:   allow") && connect.contains("reason:     allowed"),
            "{target}: {connect}"
        );
        assert!(connect.contains("intercept api.test:443"), "{connect}");
    }
    let connect = text(&explain("CONNECT", "blind.test:443").await.stdout);
    assert!(connect.contains("reason:     passthrough"), "{connect}");
    let connect = text(&explain("CONNECT", "api.test:8443").await.stdout);
    assert!(connect.contains("reason:     unknown_host"), "{connect}");

    for s in &secrets {
        for (what, o) in [
            ("allow", &allow),
            ("deny", &deny),
            ("ambiguous", &ambiguous),
        ] {
            let all = format!("{}{}", text(&o.stdout), text(&o.stderr));
            assert_absent(s, &format!("keyward explain ({what}) output"), &all);
        }
    }
}

/// A running `keyward serve`: the child, its listening line, and its whole stderr once it ends.
struct Served {
    child: tokio::process::Child,
    line: String,
    stderr: tokio::task::JoinHandle<Vec<String>>,
}

impl Served {
    /// Waits (bounded) for the child to end and returns its exit status and stderr.
    async fn finish(mut self) -> (std::process::ExitStatus, String) {
        let status = bounded("keyward serve exit", self.child.wait())
            .await
            .unwrap();
        let lines = bounded("keyward serve stderr", self.stderr).await.unwrap();
        (status, lines.join("\n"))
    }

    /// Sends one request without credentials (a 407 and a record to flush), then SIGTERM;
    /// returns what `finish` returns.
    async fn refuse_one_then_terminate(self) -> (std::process::ExitStatus, String) {
        let proxy: std::net::SocketAddr = field(&self.line, "proxy").parse().unwrap();
        let refused = common::raw_exchange(
            proxy,
            b"GET http://api.test/repos/a/b/issues HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(refused.status, 407);
        let pid = self.child.id().unwrap().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(killed.success());
        self.finish().await
    }
}

/// Spawns `keyward serve`, waits (bounded) for the listening line.
async fn serve(config: &str) -> Served {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["serve", "--config", config]);
    serve_cmd(cmd).await
}

/// Spawns `cmd` (a `keyward serve`, possibly behind a launcher that execs it), waits (bounded)
/// for the listening line.
async fn serve_cmd(cmd: tokio::process::Command) -> Served {
    serve_logging(cmd, "info").await
}

/// `serve_cmd` with `RUST_LOG` set to `level`.
async fn serve_logging(mut cmd: tokio::process::Command, level: &str) -> Served {
    let mut child = cmd
        .env("RUST_LOG", level)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = Vec::new();
    let line = bounded("the listening line", async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push(line.clone());
            if line.starts_with("keyward listening ") {
                return line;
            }
        }
        panic!("keyward serve exited before listening:\n{}", log.join("\n"));
    })
    .await;
    // Keep draining stderr (so the child never blocks on a full pipe) until it closes.
    let stderr = tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            log.push(line);
        }
        log
    });
    Served {
        child,
        line,
        stderr,
    }
}

fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
}

/// `RUST_LOG=trace` must not print a secret either: the HTTP/2 and TLS libraries' debug output
/// (frames, whole handshakes) is kept out, and an agent's server name naming a credential,
/// which rustls traced, is not in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_logging_keeps_the_wire_libraries_quiet() {
    let dir = tempfile::tempdir().unwrap();
    let (file, secrets) = explain_policy(dir.path());
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["serve", "--config", file.to_str().unwrap()]);
    let served = serve_logging(cmd, "trace").await;
    let proxy: std::net::SocketAddr = field(&served.line, "proxy").parse().unwrap();
    let admin = field(&served.line, "admin");
    let minted: serde_json::Value = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(format!("http://{admin}/v1/tasks"))
        .bearer_auth(&secrets[1])
        .json(&serde_json::json!({"agent": "bot", "intent": ["api.issues.read"]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let auth = common::basic(
        minted["task"].as_str().unwrap(),
        minted["token"].as_str().unwrap(),
    );
    let sni = format!(
        "{}.api.test",
        secrets[0].to_ascii_lowercase().replace('_', "-")
    );
    let (tcp, resp) = common::connect_raw(proxy, "api.test:443", Some(&auth)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let ca = std::fs::read(dir.path().join("ca.pem")).unwrap();
    let handshake = common::tls_over(tcp, &sni, &ca, &[b"http/1.1"]).await;
    assert!(
        handshake.is_err(),
        "a server name that is not the CONNECT host"
    );
    let (_, log) = served.refuse_one_then_terminate().await;
    assert!(
        log.contains(" DEBUG keyward::"),
        "RUST_LOG=trace was not taken:\n{log}"
    );
    assert!(!log.contains(&sni), "the server name was logged:\n{log}");
    let wire: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("DEBUG") || l.contains("TRACE"))
        .filter(|l| {
            [" h2::", " rustls::", " tokio_rustls::"]
                .iter()
                .any(|t| l.contains(t))
        })
        .collect();
    assert!(wire.is_empty(), "{wire:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_prints_the_listening_line_once_bound() {
    let dir = tempfile::tempdir().unwrap();
    let (file, secrets) = explain_policy(dir.path());
    let mut served = serve(file.to_str().unwrap()).await;
    let line = served.line.clone();
    let proxy: std::net::SocketAddr = field(&line, "proxy").parse().unwrap();
    let admin: std::net::SocketAddr = field(&line, "admin").parse().unwrap();
    let ca = PathBuf::from(field(&line, "ca"));
    assert!(proxy.ip().is_loopback() && proxy.port() != 0, "{line}");
    assert!(admin.ip().is_loopback() && admin.port() != 0, "{line}");
    assert_ne!(proxy, admin);
    assert!(ca.exists(), "the CA was created at {}", ca.display());
    // Bound means reachable.
    let health = bounded(
        "healthz",
        reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{admin}/healthz"))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    let tcp = bounded("proxy port", tokio::net::TcpStream::connect(proxy)).await;
    assert!(tcp.is_ok());
    served.child.start_kill().unwrap();
    let (_, log) = served.finish().await;
    assert!(log.contains(&line));
    for s in &secrets {
        assert_absent(s, "keyward serve stderr", &log);
    }
}

/// A short admin token is warned about at start (never shown), since the admin listener takes
/// it as the only proof of an operator.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_warns_about_a_short_admin_token_without_showing_it() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    std::fs::write(dir.path().join("admin-token"), "short-admin").unwrap();
    let mut served = serve(file.to_str().unwrap()).await;
    served.child.start_kill().unwrap();
    let (_, log) = served.finish().await;
    let warning = log
        .lines()
        .find(|l| l.contains("the admin token is short"))
        .unwrap_or_else(|| panic!("no warning in:\n{log}"));
    assert!(
        warning.contains("WARN") && warning.contains("bytes=11"),
        "{warning}"
    );
    assert_absent("short-admin", "keyward serve stderr", &log);

    // A long one is not.
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    let mut served = serve(file.to_str().unwrap()).await;
    served.child.start_kill().unwrap();
    let (_, log) = served.finish().await;
    assert!(!log.contains("admin token is short"), "{log}");
}

#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exits_0_on_sigterm_and_flushes_the_audit_log() {
    let dir = tempfile::tempdir().unwrap();
    let (file, secrets) = explain_policy(dir.path());
    let served = serve(file.to_str().unwrap()).await;
    let (status, log) = served.refuse_one_then_terminate().await;
    assert_eq!(status.code(), Some(0), "exit status after SIGTERM:\n{log}");
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    assert!(audit.contains("\"missing_credentials\""), "{audit}");
    for s in &secrets {
        assert_absent(s, "the audit log", &audit);
        assert_absent(s, "keyward serve stderr", &log);
    }
}

/// A sidecar pinned to one CPU runs one worker; `KEYWARD_WORKERS` overrides the CPU count.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_runs_one_worker_per_cpu_it_may_use() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    for (run, (workers, expected)) in [(None, "workers=1"), (Some("3"), "workers=3")]
        .into_iter()
        .enumerate()
    {
        // `taskset` sets the affinity mask and execs keyward, so the child is keyward itself.
        let mut cmd = tokio::process::Command::new("taskset");
        cmd.args(["-c", "0", BIN, "serve", "--config", file.to_str().unwrap()]);
        match workers {
            Some(n) => cmd.env("KEYWARD_WORKERS", n),
            None => cmd.env_remove("KEYWARD_WORKERS"),
        };
        let served = serve_cmd(cmd).await;
        // Either runtime (one thread, or a pool) serves the proxy listener end to end and
        // stops cleanly on SIGTERM, its record flushed.
        let (status, log) = served.refuse_one_then_terminate().await;
        assert_eq!(
            status.code(),
            Some(0),
            "KEYWARD_WORKERS={workers:?}:\n{log}"
        );
        assert!(
            log.contains(expected),
            "KEYWARD_WORKERS={workers:?}:\n{log}"
        );
        let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
        assert_eq!(
            audit.matches("\"missing_credentials\"").count(),
            run + 1,
            "KEYWARD_WORKERS={workers:?}: {audit}"
        );
    }
}

/// A `KEYWARD_WORKERS` keyward cannot use is said in one sentence and exit 1: not silently
/// replaced by the default, nor obeyed into a million threads that never get to listen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_refuses_a_worker_count_it_cannot_use() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    for bad in ["0", "abc", "-3", "999999"] {
        let out = bounded(
            "keyward exit",
            tokio::process::Command::new(BIN)
                .args(["serve", "--config", file.to_str().unwrap()])
                .env("KEYWARD_WORKERS", bad)
                .kill_on_drop(true)
                .output(),
        )
        .await
        .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad}: {err}");
        assert_eq!(err.lines().count(), 1, "{bad}: {err}");
        assert!(
            err.contains("KEYWARD_WORKERS must be a whole number from 1 to 1024"),
            "{err}"
        );
        assert!(err.contains(&format!("`{bad}`")), "{err}");
    }
}

/// The listeners queue as many new connections as the kernel allows (4,096 asked for), not
/// the usual 128, which overflowed under a burst and held each client that overflowed for a
/// second.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_listens_with_a_deep_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    let served = serve(file.to_str().unwrap()).await;
    let somaxconn: u32 = std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    for key in ["proxy", "admin"] {
        let addr: std::net::SocketAddr = field(&served.line, key).parse().unwrap();
        // `ss` shows a listening socket's backlog as its Send-Q.
        let out = std::process::Command::new("ss")
            .args(["-ltnH", &format!("sport = :{}", addr.port())])
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&out.stdout);
        let backlog: u32 = listing
            .split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("no listening socket in {listing:?}"))
            .parse()
            .unwrap();
        assert_eq!(backlog, somaxconn.min(4096), "{key}: {listing}");
    }
    let (code, log) = served.refuse_one_then_terminate().await;
    assert_eq!(code.code(), Some(0), "{log}");
}

/// keyward turns transparent huge pages off for itself: with them, mimalloc's arenas made a
/// few touched KiB cost 2 MiB each (an idle keyward held 27 MiB instead of 12).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_keeps_to_small_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    let served = serve(file.to_str().unwrap()).await;
    let pid = served.child.id().unwrap();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let thp = status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .unwrap_or_else(|| panic!("no THP_enabled in /proc/{pid}/status:\n{status}"));
    assert_eq!(thp.trim(), "0", "{status}");
    let (code, log) = served.refuse_one_then_terminate().await;
    assert_eq!(code.code(), Some(0), "{log}");
}

/// Runs `keyward task ...` against `admin` with `token` in `KEYWARD_ADMIN_TOKEN`.
async fn task_cmd(admin: &str, token: &str, args: &[&str]) -> Output {
    let out = tokio::process::Command::new(BIN)
        .arg("task")
        .args(args)
        .args(["--admin", &format!("http://{admin}")])
        .env("KEYWARD_ADMIN_TOKEN", token)
        .kill_on_drop(true)
        .output();
    bounded(&format!("keyward task {args:?}"), out)
        .await
        .unwrap()
}

/// Under an open-files limit too low for `proxy.max_connections`, keyward takes only as many
/// connections as fit (two descriptors each, 512 for the rest) and says so: past the limit,
/// `accept` would fail before any place was full, and silent clients would never give theirs up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_low_open_files_limit_caps_the_places_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    let mut cmd = tokio::process::Command::new("sh");
    cmd.args([
        "-c",
        &format!(
            "ulimit -n 600 && exec {BIN} serve --config {}",
            file.display()
        ),
    ]);
    let mut served = serve_cmd(cmd).await;
    let admin = field(&served.line, "admin").to_string();
    // Serving all the same.
    let health = bounded("healthz", reqwest::get(format!("http://{admin}/healthz")))
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
    served.child.start_kill().unwrap();
    let (_, log) = served.finish().await;
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("the proxy takes only this many connections at once")
            && l.contains("places=44")),
        "{log}"
    );
}

/// `task list` pages through the list (500 at a time), so it shows every task once however
/// many there are, and keyward never answers the whole list at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_list_shows_every_task_across_pages() {
    let dir = tempfile::tempdir().unwrap();
    let (file, secrets) = explain_policy(dir.path());
    let mut served = serve(file.to_str().unwrap()).await;
    let admin = field(&served.line, "admin").to_string();
    let token = secrets[1].clone();
    let http = reqwest::Client::new();
    for i in 0..1001 {
        let resp = bounded(
            "mint",
            http.post(format!("http://{admin}/v1/tasks"))
                .bearer_auth(&token)
                .json(&serde_json::json!({"agent": "bot", "task": format!("t-{i:04}"), "intent": ["api.issues.read"]}))
                .send(),
        )
        .await
        .unwrap();
        assert_eq!(resp.status().as_u16(), 201);
    }
    let out = task_cmd(&admin, &token, &["list"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listing = text(&out.stdout);
    let ids: Vec<&str> = listing
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|id| id.starts_with("t-"))
        .collect();
    let want: Vec<String> = (0..1001).map(|i| format!("t-{i:04}")).collect();
    assert_eq!(ids, want);
    served.child.start_kill().unwrap();
    let _ = served.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_mint_list_and_revoke_drive_the_admin_api() {
    let dir = tempfile::tempdir().unwrap();
    let (file, secrets) = explain_policy(dir.path());
    let mut served = serve(file.to_str().unwrap()).await;
    let admin = field(&served.line, "admin").to_string();
    let proxy: std::net::SocketAddr = field(&served.line, "proxy").parse().unwrap();
    // Read from a file with its newline, as `$(cat admin-token)` or an env Secret gives it.
    let token = format!("{}\n", secrets[1]);

    let out = task_cmd(
        &admin,
        &token,
        &[
            "mint",
            "--agent",
            "bot",
            "--intent",
            "api.issues.read, ",
            "--where",
            "owner=acme",
            "--ttl",
            "10m",
            "--max-requests",
            "5",
            "--task",
            "TICKET-7",
        ],
    )
    .await;
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    let url = stdout
        .lines()
        .find_map(|l| l.strip_prefix("export HTTPS_PROXY="))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no export line in {stdout:?}"))
        .to_string();
    assert!(
        url.starts_with("http://TICKET-7:kw_") && url.ends_with(&format!("@{proxy}")),
        "{url}"
    );
    // curl reads only the lowercase `http_proxy`: both cases are exported.
    for var in ["HTTP_PROXY", "https_proxy", "http_proxy"] {
        assert!(
            stdout.contains(&format!(" {var}={url}")),
            "{var} in {stdout:?}"
        );
    }
    let minted_token = url
        .trim_start_matches("http://TICKET-7:")
        .split('@')
        .next()
        .unwrap()
        .to_string();

    // The proxy URL works: a request outside the constraint is refused by name, not by 407.
    let refused = common::raw_exchange(
        proxy,
        format!(
            "GET https://api.test/repos/other/x/issues HTTP/1.1\r\nHost: api.test\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            common::basic("TICKET-7", &minted_token)
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(refused.status, 403, "{}", refused.text());
    assert_eq!(
        refused.header("x-keyward-reason").as_deref(),
        Some("constraint_mismatch")
    );

    let out = task_cmd(&admin, &token, &["list"]).await;
    let listing = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let row = listing
        .lines()
        .find(|l| l.starts_with("TICKET-7 "))
        .unwrap_or_else(|| panic!("no row for the task in {listing:?}"));
    assert!(
        row.contains("bot") && row.contains("active") && row.contains(" 0/5 "),
        "{row}"
    );
    // Requests used of its budget (the refusal above did not count), and the intent with the
    // constraints it was minted with.
    assert!(row.ends_with("api.issues.read{owner=acme}"), "{row}");
    assert_absent(&minted_token, "task list", &listing);

    // An id is checked before it becomes a path segment: this must not revoke TICKET-7.
    let out = task_cmd(&admin, &token, &["revoke", "TICKET-7?x=1"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("not a task id"),
        "{}",
        text(&out.stderr)
    );
    let listing = text(&task_cmd(&admin, &token, &["list"]).await.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("TICKET-7 ") && l.contains("active")),
        "{listing}"
    );
    let out = task_cmd(&admin, &token, &["revoke", "TICKET-7"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = task_cmd(&admin, &token, &["list"]).await;
    let listing = text(&out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("TICKET-7 ") && l.contains("revoked")),
        "{listing}"
    );
    // Filtered: the revoked task is not among the active ones, is among bot's.
    let active = task_cmd(&admin, &token, &["list", "--status", "active"]).await;
    assert!(active.status.success(), "{}", text(&active.stderr));
    assert!(
        !text(&active.stdout).contains("TICKET-7"),
        "{}",
        text(&active.stdout)
    );
    let bots = task_cmd(
        &admin,
        &token,
        &["list", "--agent", "bot", "--status", "revoked"],
    )
    .await;
    assert!(
        text(&bots.stdout).contains("TICKET-7"),
        "{}",
        text(&bots.stderr)
    );
    let out = task_cmd(&admin, &token, &["list", "--agent", "bot&status=active"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("not an agent name"),
        "{}",
        text(&out.stderr)
    );

    // A wrong token: exit 1, one sentence naming the refusal, never the token.
    let out = task_cmd(&admin, "not-the-token", &["list"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = text(&out.stderr);
    assert!(err.contains("401"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert_absent(&secrets[1], "task list stderr", &err);

    // Pointed at something that is not keyward's admin API: an error, not an empty table.
    let other = common::Upstream::plain().await;
    let out = task_cmd(&other.addr.to_string(), &token, &["list"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("without a task list"),
        "{}",
        text(&out.stderr)
    );

    served.child.start_kill().unwrap();
    let (_, log) = served.finish().await;
    for s in secrets.iter().chain([&minted_token]) {
        assert_absent(s, "keyward serve stderr", &log);
    }
}

/// An admin listener that accepts and never answers (its places all held, say) does not hang
/// `keyward task`: it gives up after `--timeout` with one sentence, exit 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_commands_give_up_on_an_admin_api_that_never_answers() {
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = silent.local_addr().unwrap().to_string();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            open.push(tcp);
        }
    });
    let started = std::time::Instant::now();
    let out = task_cmd(
        &admin,
        "whatever",
        &["revoke", "TICKET-1", "--timeout", "1"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    let err = text(&out.stderr);
    assert!(
        err.contains(&format!(
            "the admin API at http://{admin} did not answer within 1 s"
        )),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(started.elapsed() < std::time::Duration::from_secs(10));
    held.abort();
}

/// Any other server's 200 is not taken for keyward's answer: `mint` must not print an
/// `export` of empty proxy variables (evaluated, it would send the agent around keyward), nor
/// `revoke` say a task was revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_commands_refuse_an_answer_that_is_not_keywards() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let other = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = other.local_addr().unwrap().to_string();
    let server = tokio::spawn(async move {
        while let Ok((mut tcp, _)) = other.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = tcp.read(&mut buf).await;
                let body = "{\"ok\":true}";
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tcp.write_all(answer.as_bytes()).await;
            });
        }
    });
    for args in [
        &["mint", "--agent", "bot", "--intent", "x.read"][..],
        &["revoke", "TICKET-1"][..],
        &["list"][..],
    ] {
        let out = task_cmd(&admin, "whatever", args).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
        let err = text(&out.stderr);
        assert!(
            err.contains("is it keyward's admin API?"),
            "{args:?}: {err}"
        );
    }
    server.abort();
}

/// `keyward check` of the test policy with `audit.path` set to `path`.
async fn check_with_audit_path(dir: &Path, path: &str) -> Output {
    let file = edited_policy(
        dir,
        &[(
            "audit: { path: audit.jsonl }",
            &format!("audit: {{ path: {path} }}"),
        )],
    );
    keyward(&["check", "--config", file.to_str().unwrap()]).await
}

/// `audit.path` naming another of the policy's files under another spelling (absolute
/// against relative) or through a link is found by what it names on disk: `check` refuses it
/// as it does the same spelling.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_an_audit_path_that_is_another_policy_file_by_any_name() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    let credential = dir.path().join("api-token");
    assert!(credential.exists());
    std::os::unix::fs::symlink(&file, dir.path().join("link.jsonl")).unwrap();
    std::fs::hard_link(&credential, dir.path().join("hard.jsonl")).unwrap();
    for (path, says) in [
        (credential.display().to_string(), "credential `api_token`"),
        ("link.jsonl".to_string(), "the policy file itself"),
        ("hard.jsonl".to_string(), "credential `api_token`"),
    ] {
        let out = check_with_audit_path(dir.path(), &path).await;
        assert_eq!(out.status.code(), Some(1), "{path}: {out:?}");
        let err = text(&out.stderr);
        assert!(err.contains("audit.path"), "{path}: {err}");
        assert!(err.contains(says), "{path}: {err}");
    }
}

/// What `serve` would refuse about the audit path on disk, `check` says first: a directory,
/// or a device that discards what is written. `/dev/stdout` (a link to whatever standard
/// output `check` has) and a new file are fine.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_refuses_an_audit_path_serve_could_not_use() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("logs")).unwrap();
    std::os::unix::fs::symlink("/dev/null", dir.path().join("null-link")).unwrap();
    for (path, says) in [
        ("logs", "is a directory"),
        ("/tmp", "is a directory"),
        ("/dev/null", "discards what is written"),
        ("/dev/zero", "discards what is written"),
        ("null-link", "discards what is written"),
    ] {
        let out = check_with_audit_path(dir.path(), path).await;
        assert_eq!(out.status.code(), Some(1), "{path}: {out:?}");
        let err = text(&out.stderr);
        // At the key, as every policy error: `file:line:column: key.path: message`.
        assert!(
            err.contains("policy.yaml:5:16: audit.path: `"),
            "{path}: {err}"
        );
        assert!(err.contains(says), "{path}: {err}");
    }
    for path in ["/dev/stdout", "logs/audit.jsonl"] {
        let out = check_with_audit_path(dir.path(), path).await;
        assert_eq!(out.status.code(), Some(0), "{path}: {out:?}");
    }
}

/// `keyward audit verify` checks the files keyward wrote: a whole chain is ok (with its last
/// hash, to keep elsewhere); an edited or removed record is named by its line; exit 1.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_verify_passes_a_whole_log_and_names_the_first_broken_line() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    let mut log = String::new();
    for _ in 0..2 {
        let served = serve(file.to_str().unwrap()).await;
        let (status, stderr) = served.refuse_one_then_terminate().await;
        assert_eq!(status.code(), Some(0));
        log = stderr;
    }
    let audit = dir.path().join("audit.jsonl");
    let text = std::fs::read_to_string(&audit).unwrap();
    assert_eq!(text.lines().count(), 2);
    let last_hash = text
        .lines()
        .last()
        .and_then(|l| l.split("\"hash\":\"").nth(1))
        .map(|h| h.trim_end_matches("\"}").to_string())
        .unwrap();

    // keyward logged where the chain ended when it closed the file.
    assert!(
        log.lines().any(|l| l.contains("audit chain end")
            && l.contains(&last_hash)
            && l.contains("seq=2")),
        "{log}"
    );
    let out = keyward(&["audit", "verify", audit.to_str().unwrap()]).await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains(": ok, 2 records, last hash "), "{stdout}");
    assert!(stdout.contains(&last_hash), "{stdout}");

    // An edited first record; a log missing its first record.
    let edited = dir.path().join("edited.jsonl");
    std::fs::write(&edited, text.replacen("missing_credentials", "allowed", 1)).unwrap();
    let cut = dir.path().join("cut.jsonl");
    std::fs::write(&cut, text.lines().nth(1).unwrap().to_string() + "\n").unwrap();
    let out = keyward(&[
        "audit",
        "verify",
        audit.to_str().unwrap(),
        edited.to_str().unwrap(),
        cut.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{}:1: hash does not match", edited.display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{}:1: the file starts after seq 1", cut.display())),
        "{stdout}"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("2 of 3 audit files do not verify"));
    // A directory, or a file that is not there: named with why, the others still checked.
    let missing = dir.path().join("missing.jsonl");
    let out = keyward(&[
        "audit",
        "verify",
        dir.path().to_str().unwrap(),
        missing.to_str().unwrap(),
        audit.to_str().unwrap(),
    ])
    .await;
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(&format!("{}: is a directory", dir.path().display())),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("{}: cannot be read: ", missing.display())),
        "{stdout}"
    );
    assert!(stdout.contains(": ok, 2 records, last hash "), "{stdout}");

    // The piece verifies as one from the middle of a log, its first record taken on trust.
    let out = keyward(&["audit", "verify", "--from-middle", cut.to_str().unwrap()]).await;
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(": ok, 1 records from seq 2 (the first taken on trust)"),
        "{stdout}"
    );
    assert!(stdout.contains(&last_hash), "{stdout}");
}

/// A credential that cannot be read is logged with why: the variable that is unset, the file
/// that is missing, the command that failed (by its program, never its arguments or output).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_says_why_each_credential_cannot_be_read() {
    let dir = tempfile::tempdir().unwrap();
    let (file, secrets) = explain_policy(dir.path());
    let policy = std::fs::read_to_string(&file).unwrap().replace(
        "  api_token: { source: file:api-token }\n",
        "  api_token: { source: file:api-token }\n  \
         unset: { source: env:KEYWARD_TEST_SURELY_UNSET }\n  \
         gone: { source: file:no-such-file }\n  \
         failing: { source: { exec: [sh, -c, \"echo sk_printed_then_failed; exit 3\"] } }\n  \
         absent: { source: { exec: [/no/such/program, --token=sk_in_an_argument] } }\n",
    );
    std::fs::write(&file, policy).unwrap();
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(["serve", "--config", file.to_str().unwrap()])
        .env_remove("KEYWARD_TEST_SURELY_UNSET");
    let served = serve_cmd(cmd).await;
    let (_, log) = served.refuse_one_then_terminate().await;
    let line = |name: &str| {
        log.lines()
            .find(|l| l.contains("cannot be read") && l.contains(&format!("credential={name}")))
            .unwrap_or_else(|| panic!("no line for {name}:\n{log}"))
            .to_string()
    };
    assert!(line("unset").contains("environment variable KEYWARD_TEST_SURELY_UNSET is not set"));
    assert!(
        line("gone").contains("no-such-file cannot be read: entity not found"),
        "{log}"
    );
    assert!(
        line("failing").contains("command `sh` failed (exit status: 3)"),
        "{log}"
    );
    assert!(
        line("absent").contains("command `/no/such/program` could not be run"),
        "{log}"
    );
    assert!(
        !log.contains("api_token"),
        "a readable credential was reported:\n{log}"
    );
    for s in secrets
        .iter()
        .map(String::as_str)
        .chain(["sk_printed_then_failed", "sk_in_an_argument"])
    {
        assert_absent(s, "keyward serve stderr", &log);
    }
}

/// A reload refused through the admin API is logged like one refused on SIGHUP: the alert on
/// failed reloads sends the operator to keyward's log.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refused_through_the_api_is_logged_with_its_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (file, secrets) = explain_policy(dir.path());
    let served = serve(file.to_str().unwrap()).await;
    let admin: std::net::SocketAddr = field(&served.line, "admin").parse().unwrap();
    let good = std::fs::read_to_string(&file).unwrap();
    // A reload that succeeds logs the new policy's warnings, as a start does.
    std::fs::write(
        &file,
        good.replace("    risk: medium\n", "    risk: high\n"),
    )
    .unwrap();
    let reload = || async {
        bounded(
            "reload",
            reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap()
                .post(format!("http://{admin}/v1/reload"))
                .bearer_auth(&secrets[1])
                .send(),
        )
        .await
        .unwrap()
    };
    assert_eq!(reload().await.status().as_u16(), 200);
    std::fs::write(&file, good.replace("max_ttl: 1h", "max_ttl: forever")).unwrap();
    assert_eq!(reload().await.status().as_u16(), 400);
    let (_, log) = served.refuse_one_then_terminate().await;
    assert!(
        log.contains("capability `api.issues.write` is high-risk"),
        "{log}"
    );
    assert!(log.contains("agents.bot.max_ttl"), "{log}");
    assert!(
        log.contains("reload failed; the previous policy keeps serving"),
        "{log}"
    );
    for s in &secrets {
        assert_absent(s, "keyward serve stderr", &log);
    }
}

/// An upstream failure tells the agent only that it failed (502); keyward's log says why, with
/// the request's id to find its audit record.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_failure_is_logged_with_its_cause_and_request_id() {
    let dir = tempfile::tempdir().unwrap();
    let (file, secrets) = explain_policy(dir.path());
    // A port nothing listens on (bound, then released).
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let policy = std::fs::read_to_string(&file).unwrap().replace(
        "    hosts: [api.test]\n",
        &format!(
            "    hosts: [api.test]\n    scheme: http\n    port: {port}\n    connect_to: {dead}\n    allow_cleartext: true\n",
            port = dead.port()
        ),
    );
    std::fs::write(&file, policy).unwrap();
    let served = serve(file.to_str().unwrap()).await;
    let admin: std::net::SocketAddr = field(&served.line, "admin").parse().unwrap();
    let proxy: std::net::SocketAddr = field(&served.line, "proxy").parse().unwrap();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let minted: serde_json::Value = bounded(
        "mint",
        client
            .post(format!("http://{admin}/v1/tasks"))
            .bearer_auth(&secrets[1])
            .json(&serde_json::json!({"agent": "bot", "intent": ["api.issues.read"]}))
            .send(),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let user = format!(
        "{}:{}",
        minted["task"].as_str().unwrap(),
        minted["token"].as_str().unwrap()
    );
    let head = format!(
        "GET http://api.test:{port}/repos/a/b/issues HTTP/1.1\r\nHost: api.test:{port}\r\nProxy-Authorization: Basic {auth}\r\nConnection: close\r\n\r\n",
        port = dead.port(),
        auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, &user),
    );
    let resp = common::raw_exchange(proxy, head.as_bytes()).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    let request_id = resp.header("x-request-id").or_else(|| {
        serde_json::from_slice::<serde_json::Value>(&resp.body)
            .ok()
            .and_then(|v| v["request_id"].as_str().map(str::to_string))
    });
    let (_, log) = served.refuse_one_then_terminate().await;
    let line = log
        .lines()
        .find(|l| l.contains("upstream request failed"))
        .unwrap_or_else(|| panic!("no upstream failure logged:\n{log}"));
    assert!(
        line.contains("kind=\"connect\"") || line.contains("kind=connect"),
        "{line}"
    );
    assert!(line.contains("refused"), "{line}");
    assert!(
        line.contains(&request_id.expect("the 502 names its request")),
        "{line}"
    );
    for s in secrets
        .iter()
        .chain([&minted["token"].as_str().unwrap().to_string()])
    {
        assert_absent(s, "keyward serve stderr", &log);
    }
}

/// A reader that stops reading (`keyward explain … | head -1`) ends the command quietly with
/// exit 0, not a panic (exit 101).
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_to_a_closed_pipe_ends_quietly_with_exit_0() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    // A pipe whose read end is closed right away, long before keyward (which reads and
    // compiles the policy first) writes.
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "explain",
            "--config",
            file.to_str().unwrap(),
            "--agent",
            "bot",
        ])
        .args([
            "--intent",
            "api.issues.read",
            "GET",
            "https://api.test/repos/a/b/issues",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = bounded("explain into a closed pipe", child.wait_with_output())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(out.stderr.is_empty(), "{}", text(&out.stderr));

    // The command still finishes with its verdict: a chain that does not verify is exit 1
    // even when nobody reads what `audit verify` prints.
    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"not\":\"a record\"}\n").unwrap();
    let mut child = tokio::process::Command::new(BIN)
        .args(["audit", "verify", bad.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = bounded("verify into a closed pipe", child.wait_with_output())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
}

/// `explain_policy` in `dir` with each `(from, to)` replaced.
fn edited_policy(dir: &Path, edits: &[(&str, &str)]) -> PathBuf {
    let (file, _) = explain_policy(dir);
    let mut policy = std::fs::read_to_string(&file).unwrap();
    for (from, to) in edits {
        assert!(policy.contains(from), "{from}");
        policy = policy.replace(from, to);
    }
    std::fs::write(&file, policy).unwrap();
    file
}

type StderrLines = tokio::io::Lines<BufReader<tokio::process::ChildStderr>>;

/// The test policy with `api_token` read by `exec` (`argv`, a YAML list) instead of a file.
fn policy_with_exec_token(dir: &Path, argv: &str) -> PathBuf {
    let exec = format!("api_token: {{ source: {{ exec: {argv} }} }}");
    edited_policy(dir, &[("api_token: { source: file:api-token }", &exec)])
}

/// `spawn_serve`, then its stderr read until a line holding `needle`: the child, the rest of
/// stderr, the lines read so far and the one that held it.
async fn spawn_serve_until(
    file: &Path,
    stdout: Stdio,
    needle: &str,
) -> (tokio::process::Child, StderrLines, Vec<String>, String) {
    let (child, mut lines) = spawn_serve(file, stdout);
    let mut log = Vec::new();
    let line = read_until(&mut lines, &mut log, needle).await;
    (child, lines, log, line)
}

/// `keyward serve --config file`, its stdout as given, its stderr read line by line.
fn spawn_serve(file: &Path, stdout: Stdio) -> (tokio::process::Child, StderrLines) {
    let mut child = tokio::process::Command::new(BIN)
        .args(["serve", "--config", file.to_str().unwrap()])
        .env("RUST_LOG", "info")
        .stdout(stdout)
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = BufReader::new(child.stderr.take().unwrap()).lines();
    (child, lines)
}

/// Reads stderr into `log` (bounded) until a line contains `needle`; returns that line.
async fn read_until(lines: &mut StderrLines, log: &mut Vec<String>, needle: &str) -> String {
    bounded(needle, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            log.push(line.clone());
            if line.contains(needle) {
                return line;
            }
        }
        panic!("keyward serve ended before {needle:?}:\n{}", log.join("\n"));
    })
    .await
}

/// The rest of stderr, until it closes (bounded).
async fn read_rest(mut lines: StderrLines, mut log: Vec<String>) -> String {
    while let Ok(Ok(Some(line))) =
        tokio::time::timeout(std::time::Duration::from_secs(15), lines.next_line()).await
    {
        log.push(line);
    }
    log.join("\n")
}

/// Sends `signal` (`-TERM`, `-HUP`) to `child`.
fn signal(child: &tokio::process::Child, signal: &str) {
    let pid = child.id().unwrap().to_string();
    let sent = std::process::Command::new("kill")
        .args([signal, &pid])
        .status()
        .unwrap();
    assert!(sent.success());
}

/// logrotate moves the audit file, then sends SIGHUP. When keyward was idle for a while, its
/// writer notices the move when the SIGHUP arrives and opens the path again: the one chain end
/// it logs for that is the rotated file's (what a collector keeps), not the new empty file's.
#[cfg(unix)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_rotation_logs_the_rotated_files_chain_end_last() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    let served = serve(file.to_str().unwrap()).await;
    let proxy: std::net::SocketAddr = field(&served.line, "proxy").parse().unwrap();
    let refused = common::raw_exchange(
        proxy,
        b"GET http://api.test/a HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(refused.status, 407);
    let audit = dir.path().join("audit.jsonl");
    let text = bounded("the record", async {
        loop {
            let text = std::fs::read_to_string(&audit).unwrap_or_default();
            if text.ends_with('\n') {
                return text;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    let hash = text
        .split("\"hash\":\"")
        .nth(1)
        .unwrap()
        .trim_end_matches("\"}\n");
    std::fs::rename(&audit, dir.path().join("audit.jsonl.1")).unwrap();
    // Idle past the writer's path check (1 s), so the SIGHUP is what wakes it.
    tokio::time::sleep(std::time::Duration::from_millis(1300)).await;
    signal(&served.child, "-HUP");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    signal(&served.child, "-TERM");
    let (status, log) = served.finish().await;
    assert_eq!(status.code(), Some(0), "{log}");
    let reopened: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("audit chain end") && l.contains("reopened"))
        .collect();
    assert_eq!(reopened.len(), 1, "{log}");
    // A rotation asked for is not reported as a file removed under keyward.
    assert!(!log.contains("removed, moved or replaced"), "{log}");
    assert!(
        reopened[0].contains("seq=1") && reopened[0].contains(hash),
        "{log}"
    );
}

/// Records the audit log could not write make the exit after SIGTERM an error (2), saying so:
/// a supervisor must not read the run as clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exits_2_after_sigterm_when_audit_records_were_lost() {
    let dir = tempfile::tempdir().unwrap();
    let file = edited_policy(
        dir.path(),
        &[("audit: { path: audit.jsonl }", "audit: { path: /dev/full }")],
    );
    let served = serve(file.to_str().unwrap()).await;
    let (status, log) = served.refuse_one_then_terminate().await;
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(log.contains("1 audit record could not be written"), "{log}");
    // The chain end names what the file holds (nothing), not the record that never got there.
    assert!(log.contains("audit chain end seq=0"), "{log}");
}

/// An audit sink that stops taking records (stdout into a pipe nobody reads) does not keep
/// keyward from exiting after SIGTERM: the drain, the cut and at most 5 s for the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_exits_after_sigterm_even_when_the_audit_sink_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let file = edited_policy(
        dir.path(),
        &[
            ("audit: { path: audit.jsonl }", "audit: { path: '-' }"),
            (
                "proxy: { listen: 127.0.0.1:0 }",
                "proxy: { listen: 127.0.0.1:0, shutdown_timeout: 1s }",
            ),
        ],
    );
    let (mut child, mut lines) = spawn_serve(&file, Stdio::piped());
    // Held open and never read: once the pipe's buffer is full, every write blocks.
    let _stdout = child.stdout.take().unwrap();
    let mut log = Vec::new();
    let line = read_until(&mut lines, &mut log, "keyward listening ").await;
    let proxy: std::net::SocketAddr = field(&line, "proxy").parse().unwrap();
    // Denials of ~400-byte records: a few hundred fill a pipe's 64 KiB, then they wait.
    let requests: Vec<_> = (0..400)
        .map(|_| {
            tokio::spawn(tokio::time::timeout(
                std::time::Duration::from_secs(3),
                common::raw_exchange(
                    proxy,
                    b"GET http://api.test/repos/a/b/issues HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
                ),
            ))
        })
        .collect();
    for r in requests {
        let _ = r.await;
    }
    let stderr = tokio::spawn(read_rest(lines, log));
    let started = std::time::Instant::now();
    signal(&child, "-TERM");
    let status = tokio::time::timeout(std::time::Duration::from_secs(20), child.wait())
        .await
        .expect("keyward still running 20 s after SIGTERM with a stalled audit sink")
        .unwrap();
    let took = started.elapsed();
    let log = bounded("stderr", stderr).await.unwrap();
    assert_eq!(status.code(), Some(2), "{log}");
    let lost = log
        .split("the audit log took no more records for 5 s: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse::<u64>().ok());
    assert!(lost.is_some_and(|n| n > 0), "{log}");
    // 1 s drain + 2 s for what it cut + 5 s for the log, and some slack.
    assert!(took < std::time::Duration::from_secs(12), "took {took:?}");
}

/// An audit path that cannot be opened stops `serve` with exit 1 and one sentence naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_with_an_audit_path_it_cannot_open_exits_1_with_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    // A missing directory is made; one under a file cannot be.
    std::fs::write(dir.path().join("a-file"), "").unwrap();
    let file = edited_policy(
        dir.path(),
        &[(
            "audit: { path: audit.jsonl }",
            "audit: { path: a-file/no-such-dir/audit.jsonl }",
        )],
    );
    let out = keyward(&["serve", "--config", file.to_str().unwrap()]).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let sentence = err
        .lines()
        .find(|l| l.contains("audit log"))
        .unwrap_or_else(|| panic!("{err}"));
    assert_eq!(
        sentence.matches("cannot open the audit log").count(),
        1,
        "{err}"
    );
    assert!(sentence.contains("a-file/no-such-dir/audit.jsonl"), "{err}");
}

/// Two keywards on one audit file would interleave two hash chains, and `audit verify` would
/// read honest records as tampered: the second refuses to start, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_serve_on_the_same_audit_log_exits_1_with_one_sentence() {
    let dir = tempfile::tempdir().unwrap();
    let file = edited_policy(dir.path(), &[]);
    let (mut first, lines, log, _) =
        spawn_serve_until(&file, Stdio::null(), "keyward listening").await;
    let out = keyward(&["serve", "--config", file.to_str().unwrap()]).await;
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let sentence = err
        .lines()
        .find(|l| l.contains("is in use by another process"))
        .unwrap_or_else(|| panic!("{err}"));
    assert!(sentence.contains("audit.jsonl"), "{err}");
    assert!(!err.contains("keyward listening"), "{err}");
    // The first keeps serving, and once it has stopped the file is free again.
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first keyward stopped"
    );
    signal(&first, "-TERM");
    let status = bounded("keyward exit", first.wait()).await.unwrap();
    let log = read_rest(lines, log).await;
    assert_eq!(status.code(), Some(0), "{log}");
    let (mut again, _lines, _, _) =
        spawn_serve_until(&file, Stdio::null(), "keyward listening").await;
    signal(&again, "-TERM");
    bounded("keyward exit", again.wait()).await.unwrap();
}

/// SIGTERM while `serve` is still starting (a credential `exec` that takes its time) stops it
/// at once with exit 0, instead of after the start-up and a listening line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_starting_stops_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = policy_with_exec_token(dir.path(), "[sleep, '20']");
    let (mut child, lines, log, _) =
        spawn_serve_until(&file, Stdio::null(), "starting the async runtime").await;
    // Into the credential's `exec` by now, or soon: either way the stop must not wait for it.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    signal(&child, "-TERM");
    let status = bounded("keyward exit", child.wait()).await.unwrap();
    let log = read_rest(lines, log).await;
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert!(!log.contains("keyward listening"), "{log}");
}

/// `serve` raises its open-files soft limit to the hard one, and warns when even that is below
/// what `proxy.max_connections` needs.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_raises_the_open_files_limit_and_warns_when_it_is_too_low() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    // `prlimit` (util-linux) sets the limits and execs keyward.
    for (limits, raised, warned) in [
        ("--nofile=1024:20000", true, false),
        ("--nofile=600:700", true, true),
    ] {
        let mut cmd = tokio::process::Command::new("prlimit");
        cmd.args([limits, BIN, "serve", "--config", file.to_str().unwrap()]);
        let served = serve_cmd(cmd).await;
        let (status, log) = served.refuse_one_then_terminate().await;
        assert_eq!(status.code(), Some(0), "{limits}: {log}");
        assert_eq!(
            log.contains("raised the open-files limit"),
            raised,
            "{limits}: {log}"
        );
        assert_eq!(
            log.contains("the open-files limit is below what proxy.max_connections needs"),
            warned,
            "{limits}: {log}"
        );
    }
}

/// A SIGHUP while `serve` is still starting is not lost: the reload runs once it is up
/// (logrotate's `postrotate` may send one at any time).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_while_starting_reloads_once_started() {
    let dir = tempfile::tempdir().unwrap();
    let file = policy_with_exec_token(dir.path(), "[sh, -c, 'sleep 1; echo tok']");
    let (mut child, mut lines, mut log, _) =
        spawn_serve_until(&file, Stdio::null(), "starting the async runtime").await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    signal(&child, "-HUP");
    read_until(&mut lines, &mut log, "reloaded on SIGHUP").await;
    assert!(
        log.iter().any(|l| l.starts_with("keyward listening ")),
        "{}",
        log.join("\n")
    );
    signal(&child, "-TERM");
    let status = bounded("keyward exit", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(0));
}

/// With stderr closed (its reader gone), `serve` still ends with its own exit code: the last
/// sentence is lost, but a panic's 101 would tell a supervisor something else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_keeps_its_exit_code_when_stderr_is_closed() {
    let dir = tempfile::tempdir().unwrap();
    let file = edited_policy(
        dir.path(),
        &[("audit: { path: audit.jsonl }", "audit: { path: /dev/full }")],
    );
    let (mut child, lines, _log, line) =
        spawn_serve_until(&file, Stdio::null(), "keyward listening ").await;
    let proxy: std::net::SocketAddr = field(&line, "proxy").parse().unwrap();
    let refused = common::raw_exchange(
        proxy,
        b"GET http://api.test/repos/a/b/issues HTTP/1.1\r\nHost: api.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(refused.status, 407);
    drop(lines);
    signal(&child, "-TERM");
    let status = bounded("keyward exit", child.wait()).await.unwrap();
    assert_eq!(status.code(), Some(2));
}

/// A second SIGTERM cuts the drain short: a request still waiting on its upstream is cut and
/// recorded (`shutdown`, 503) at once instead of after `proxy.shutdown_timeout` (10 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_cuts_the_drain_short() {
    use base64::Engine as _;
    // An upstream that takes connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let (reached_tx, mut reached) = tokio::sync::mpsc::channel::<()>(4);
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = silent.accept().await {
            held.push(tcp);
            let _ = reached_tx.send(()).await;
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let file = edited_policy(
        dir.path(),
        &[(
            "    hosts: [api.test]\n",
            &format!("    hosts: [api.test]\n    scheme: http\n    allow_cleartext: true\n    connect_to: 127.0.0.1:{port}\n"),
        )],
    );
    let admin_token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    let (mut child, lines, log, line) =
        spawn_serve_until(&file, Stdio::null(), "keyward listening ").await;
    let stderr = tokio::spawn(read_rest(lines, log));
    let (proxy, admin) = (
        field(&line, "proxy").to_string(),
        field(&line, "admin").to_string(),
    );
    let minted: serde_json::Value = bounded(
        "mint",
        reqwest::Client::new()
            .post(format!("http://{admin}/v1/tasks"))
            .bearer_auth(admin_token.trim())
            .json(&serde_json::json!({"agent": "bot", "intent": ["api.issues.read"]}))
            .send(),
    )
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let auth = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        minted["task"].as_str().unwrap(),
        minted["token"].as_str().unwrap()
    ));
    let proxy: std::net::SocketAddr = proxy.parse().unwrap();
    let waiting = tokio::spawn(async move {
        let mut tcp = tokio::net::TcpStream::connect(proxy).await.unwrap();
        let req = format!("GET http://api.test/repos/a/b/issues HTTP/1.1\r\nHost: api.test\r\nProxy-Authorization: Basic {auth}\r\n\r\n");
        tokio::io::AsyncWriteExt::write_all(&mut tcp, req.as_bytes())
            .await
            .unwrap();
        let mut rest = Vec::new();
        let _ = tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest).await;
    });
    bounded("the request reaches the upstream", reached.recv()).await;

    let started = std::time::Instant::now();
    signal(&child, "-TERM");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    signal(&child, "-TERM");
    let status = bounded("keyward exit", child.wait()).await.unwrap();
    let took = started.elapsed();
    let log = bounded("stderr", stderr).await.unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        took < std::time::Duration::from_secs(5),
        "took {took:?}\n{log}"
    );
    assert!(log.contains("cutting the drain short"), "{log}");
    // The log says the stop was not clean: what was cut, and where its records are.
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("the stop cut requests")
            && l.contains("cut=1")),
        "{log}"
    );
    let audit = std::fs::read_to_string(dir.path().join("audit.jsonl")).unwrap();
    let rec: serde_json::Value = audit
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["path"] == "/repos/a/b/issues")
        .unwrap_or_else(|| panic!("no record of the cut request:\n{audit}"));
    assert_eq!(rec["outcome"], "shutdown", "{rec}");
    assert_eq!(rec["status"], 503, "{rec}");
    let _ = bounded("the agent's side", waiting).await;
    holder.abort();
}

/// A SIGTERM at any moment of start-up exits at once. One that came as start-up ended (just
/// before the listening line) reached the listener tasks before they first ran; they missed
/// it and held the exit for the whole drain (10 s), one run in three.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_at_the_end_of_start_up_exits_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = explain_policy(dir.path());
    for _ in 0..10 {
        // The runtime's first line: start-up is under way, and ends a few ms later.
        let (mut child, _lines, _log, _) =
            spawn_serve_until(&file, Stdio::null(), "starting the async runtime").await;
        signal(&child, "-TERM");
        let started = std::time::Instant::now();
        let status = bounded("keyward exit", child.wait()).await.unwrap();
        // Before its handlers are installed (the runtime's first instants), the signal's
        // default action ends the process; after, keyward stops and exits 0.
        use std::os::unix::process::ExitStatusExt;
        assert!(
            status.code() == Some(0) || status.signal() == Some(15),
            "{status:?}"
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(3),
            "took {:?}",
            started.elapsed()
        );
    }
}

/// Audit records that would go nowhere are refused at start (fail closed): `-` with standard
/// output at /dev/null (keyward started with it closed), or a path naming /dev/null. A real
/// pipe is fine. A parent of the path that is a file is named as the cause.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_that_would_be_discarded_are_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("afile"), "").unwrap();
    for (path, says) in [
        ("\"-\"", "standard output is /dev/null"),
        ("/dev/null", "discards what is written"),
        ("/dev/zero", "discards what is written"),
        ("/dev/urandom", "discards what is written"),
        ("afile/audit.jsonl", "afile` is not a directory"),
    ] {
        let file = edited_policy(
            dir.path(),
            &[(
                "audit: { path: audit.jsonl }",
                &format!("audit: {{ path: {path} }}"),
            )],
        );
        // (`output()` would pipe standard output whatever was set.)
        let child = tokio::process::Command::new(BIN)
            .args(["serve", "--config", file.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let out = child.wait_with_output();
        let out = bounded(&format!("keyward serve with {path}"), out)
            .await
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{path}: {out:?}");
        let err = text(&out.stderr);
        assert!(err.contains(says), "{path}: {err}");
    }

    let file = edited_policy(
        dir.path(),
        &[("audit: { path: audit.jsonl }", "audit: { path: \"-\" }")],
    );
    let (mut child, _lines, log, _) =
        spawn_serve_until(&file, Stdio::piped(), "keyward listening ").await;
    assert!(!log.join("\n").contains("/dev/null"), "{log:?}");
    signal(&child, "-TERM");
    bounded("keyward exit", child.wait()).await.unwrap();
}

/// SIGTERM during a reload (SIGHUP or `POST /v1/reload`) is not held up by it (a credential
/// `exec` may take 30 s): the reload is dropped unfinished and keyward stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_slow_reload_stops_at_once() {
    for by_post in [false, true] {
        sigterm_during_a_slow_reload(by_post).await;
    }
}

async fn sigterm_during_a_slow_reload(by_post: bool) {
    let dir = tempfile::tempdir().unwrap();
    let slow = dir.path().join("slow");
    let file = policy_with_exec_token(
        dir.path(),
        &format!(
            "[sh, -c, 'test -f {} && sleep 20; echo tok']",
            slow.display()
        ),
    );
    let admin_token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    let (mut child, lines, log, line) =
        spawn_serve_until(&file, Stdio::null(), "keyward listening ").await;
    let admin = field(&line, "admin").to_string();
    let stderr = tokio::spawn(read_rest(lines, log));
    // From now on reading the credential takes 20 s.
    std::fs::write(&slow, "").unwrap();
    let posted = by_post.then(|| {
        let request = reqwest::Client::new()
            .post(format!("http://{admin}/v1/reload"))
            .bearer_auth(admin_token.trim())
            .send();
        tokio::spawn(request)
    });
    if !by_post {
        signal(&child, "-HUP");
    }
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    signal(&child, "-TERM");
    let status = bounded("keyward exit", child.wait()).await.unwrap();
    let took = started.elapsed();
    let log = bounded("stderr", stderr).await.unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    if let Some(posted) = posted {
        // The reload's caller is told it was dropped.
        let answer = bounded("reload answer", posted).await.unwrap().unwrap();
        assert_eq!(answer.status(), 503);
    }
    assert!(
        took < std::time::Duration::from_secs(3),
        "took {took:?}\n{log}"
    );
}
