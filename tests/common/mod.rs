//! The integration-test harness: keyward in-process on `127.0.0.1:0` (`spawn_keyward`), with
//! what a test needs to talk to it (agents, the admin API) and to inspect it (the audit log,
//! /metrics, a leak scanner). Upstreams that report what they received are in `upstream`, raw
//! sockets and tunnels in `wire`, the standard policy and fixture in `fixture`.
//!
//! Never fixed ports, internet hosts, `set_var`, or sleeps as synchronization: every wait is a
//! bounded timeout or a bounded poll on an observable state.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::new_without_default
)]

mod fixture;
mod script;
mod upstream;
mod wire;

// Each test crate uses its own subset.
#[allow(unused_imports)]
pub use fixture::*;
#[allow(unused_imports)]
pub use script::*;
#[allow(unused_imports)]
pub use upstream::*;
#[allow(unused_imports)]
pub use wire::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};

/// Bound on every network await in the tests.
pub const NET_TIMEOUT: Duration = Duration::from_secs(10);

/// Awaits `fut` for at most `NET_TIMEOUT`; a hang is a test failure, never a stuck suite.
pub async fn bounded<T>(what: &str, fut: impl std::future::Future<Output = T>) -> T {
    match tokio::time::timeout(NET_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {NET_TIMEOUT:?}: {what}"),
    }
}

/// keyward's own log lines (every level) from every test of this binary, for the leak check.
static LOGS: std::sync::OnceLock<Arc<Mutex<Vec<u8>>>> = std::sync::OnceLock::new();

struct LogSink(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for LogSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Captures keyward's tracing output (once per test binary).
fn capture_logs() -> Arc<Mutex<Vec<u8>>> {
    LOGS.get_or_init(|| {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::default();
        let sink = buf.clone();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new("keyward=trace,warn"))
            .with_ansi(false)
            .with_writer(move || LogSink(sink.clone()))
            .try_init();
        buf
    })
    .clone()
}

/// Everything keyward logged so far in this test binary.
pub fn captured_logs() -> String {
    String::from_utf8_lossy(&capture_logs().lock().unwrap()).into_owned()
}

pub(crate) fn ring() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// ---------------------------------------------------------------------------------------------
// keyward in-process

/// A task minted through the admin API.
#[derive(Clone, Debug)]
pub struct Task {
    pub id: String,
    pub token: String,
}

/// A response as the agent saw it.
#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub version: http::Version,
    pub body: String,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", self.body))
    }
}

/// A keyward directory being prepared: files first, then `start(policy)`.
pub struct Setup {
    pub dir: tempfile::TempDir,
    secrets: Vec<String>,
}

impl Setup {
    pub fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
            secrets: Vec::new(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes a file that is not secret (a CA certificate, a policy).
    pub fn file(&self, name: &str, contents: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }

    /// Writes a credential file; its value is scanned for in every leak check.
    pub fn secret_file(&mut self, name: &str, value: &str) {
        self.file(name, &format!("{value}\n"));
        self.secrets.push(value.to_string());
    }

    /// Writes `policy.yaml` and the admin token, and starts keyward on it.
    pub async fn start(mut self, policy_yaml: &str) -> Harness {
        capture_logs();
        let admin_token = format!("adm_{}", keyward::tasks::random_hex(16));
        self.secret_file("admin-token", &admin_token);
        let policy_path = self.file("policy.yaml", policy_yaml);
        let running = match keyward::app::start(&policy_path).await {
            Ok(r) => r,
            Err(e) => panic!("keyward did not start: {e}"),
        };
        let http = reqwest::Client::builder()
            .no_proxy()
            .use_rustls_tls()
            .timeout(NET_TIMEOUT)
            .build()
            .unwrap();
        Harness {
            proxy_addr: running.proxy_addr,
            admin_addr: running.admin_addr,
            ca_path: running.ca_path.clone(),
            audit_path: self.dir.path().join("audit.jsonl"),
            policy_path,
            admin_token,
            secrets: Mutex::new(self.secrets),
            agent_seen: Mutex::new(Vec::new()),
            http,
            running: Some(running),
            dir: self.dir,
        }
    }
}

/// keyward running in this process, with what a test needs to talk to it and inspect it.
pub struct Harness {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ca_path: PathBuf,
    pub audit_path: PathBuf,
    pub policy_path: PathBuf,
    pub admin_token: String,
    /// Values that must never appear in the audit log, /metrics or an agent-visible body.
    secrets: Mutex<Vec<String>>,
    /// Every response body (and header block) an agent saw, for the leak check.
    agent_seen: Mutex<Vec<String>>,
    pub http: reqwest::Client,
    running: Option<keyward::app::Running>,
    pub dir: tempfile::TempDir,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(r) = &self.running {
            r.state.begin_shutdown();
        }
    }
}

/// Starts keyward on `policy_yaml` in a fresh temporary directory (admin token in `admin-token`).
pub async fn spawn_keyward(policy_yaml: &str) -> Harness {
    Setup::new().start(policy_yaml).await
}

impl Harness {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn state(&self) -> &Arc<keyward::state::State> {
        &self.running.as_ref().unwrap().state
    }

    /// Stops keyward and flushes its audit log.
    pub async fn shutdown(mut self) {
        self.stop().await;
    }

    /// Stops keyward and flushes its audit log, keeping its files to read.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            // Shutdown may take its whole drain (10 s), the grace after it (2 s) and the
            // audit log's flush (at most 5 s).
            let bound = Duration::from_secs(20);
            match tokio::time::timeout(bound, r.shutdown()).await {
                Err(_) => panic!("shutdown took more than {bound:?}"),
                Ok(Err(why)) => panic!("shutdown: {why}"),
                Ok(Ok(())) => {}
            }
        }
    }

    pub fn add_secret(&self, s: &str) {
        self.secrets.lock().unwrap().push(s.to_string());
    }

    pub fn ca_pem(&self) -> Vec<u8> {
        std::fs::read(&self.ca_path).unwrap()
    }

    /// `Proxy-Authorization` value for `task`.
    pub fn proxy_auth(task: &Task) -> String {
        basic(&task.id, &task.token)
    }

    // --- agents -------------------------------------------------------------------------------

    /// A reqwest client that uses keyward as its proxy for `task` and trusts keyward's CA only.
    pub fn agent(&self, task: &Task) -> reqwest::Client {
        self.agent_builder(Some(task)).build().unwrap()
    }

    pub fn agent_builder(&self, task: Option<&Task>) -> reqwest::ClientBuilder {
        let mut proxy = reqwest::Proxy::all(format!("http://{}", self.proxy_addr)).unwrap();
        if let Some(t) = task {
            proxy = proxy.basic_auth(&t.id, &t.token);
        }
        reqwest::Client::builder()
            .use_rustls_tls()
            .proxy(proxy)
            .add_root_certificate(reqwest::Certificate::from_pem(&self.ca_pem()).unwrap())
            .timeout(NET_TIMEOUT)
    }

    /// Sends a request as an agent and remembers what the agent saw.
    pub async fn send(&self, rb: reqwest::RequestBuilder) -> Resp {
        let resp = bounded("agent request", rb.send())
            .await
            .unwrap_or_else(|e| panic!("agent request failed: {e:?}"));
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let version = resp.version();
        let body = bounded("agent body", resp.text()).await.unwrap();
        self.saw(&format!("{headers:?}\n{body}"));
        Resp {
            status,
            headers,
            version,
            body,
        }
    }

    /// Records text an agent saw (for `assert_no_leaks`).
    pub fn saw(&self, text: &str) {
        self.agent_seen.lock().unwrap().push(text.to_string());
    }

    /// Writes `request` on a fresh connection to the proxy listener and reads the response to
    /// EOF (send `Connection: close`).
    pub async fn raw(&self, request: &str) -> RawResp {
        let resp = raw_exchange(self.proxy_addr, request.as_bytes()).await;
        self.saw(&resp.text());
        resp
    }

    // --- admin --------------------------------------------------------------------------------

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{}", self.admin_addr, path)
    }

    /// Calls the admin API with the admin token.
    pub async fn admin(
        &self,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        self.admin_as(Some(&self.admin_token.clone()), method, path, body)
            .await
    }

    /// Calls the admin API with `token` (or none).
    pub async fn admin_as(
        &self,
        token: Option<&str>,
        method: http::Method,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut rb = self.http.request(method, self.admin_url(path));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let resp = bounded("admin request", rb.send()).await.unwrap();
        let status = resp.status().as_u16();
        let text = bounded("admin body", resp.text()).await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        (status, value)
    }

    /// `POST /v1/tasks` with `body`; registers a returned token as a secret.
    pub async fn mint_body(&self, body: Value) -> (u16, Value) {
        let (status, v) = self
            .admin(http::Method::POST, "/v1/tasks", Some(body))
            .await;
        if let Some(t) = v.get("token").and_then(Value::as_str) {
            self.add_secret(t);
        }
        (status, v)
    }

    /// Mints a task for `agent` with `intent` (a JSON array per SPEC §5).
    pub async fn mint(&self, agent: &str, intent: Value) -> Task {
        self.mint_with(json!({"agent": agent, "intent": intent}))
            .await
    }

    /// Mints with a full request body; fails unless 201.
    pub async fn mint_with(&self, body: Value) -> Task {
        let (status, v) = self.mint_body(body).await;
        assert_eq!(status, 201, "mint failed: {v}");
        Task {
            id: v["task"].as_str().unwrap().to_string(),
            token: v["token"].as_str().unwrap().to_string(),
        }
    }

    pub async fn revoke(&self, id: &str) {
        let (status, v) = self
            .admin(http::Method::DELETE, &format!("/v1/tasks/{id}"), None)
            .await;
        assert_eq!(status, 200, "revoke failed: {v}");
    }

    pub async fn metrics(&self) -> String {
        let resp = bounded("metrics", self.http.get(self.admin_url("/metrics")).send())
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let body = bounded("metrics body", resp.text()).await.unwrap();
        assert_eq!(status, 200, "/metrics: {body}");
        body
    }

    /// The value of one metric series (exact text before the value), or `None`.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics().await, series)
    }

    /// The value of one metric series once it reads `expected` (or, after 2 s, whatever it
    /// reads): what a response's end counts is counted after the agent saw that end.
    pub async fn metric_settled(&self, series: &str, expected: f64) -> Option<f64> {
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        loop {
            let value = self.metric(series).await;
            if value == Some(expected) || std::time::Instant::now() > deadline {
                return value;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // --- audit --------------------------------------------------------------------------------

    pub fn audit_text(&self) -> String {
        std::fs::read_to_string(&self.audit_path).unwrap_or_default()
    }

    /// Every record written so far; each line must be one JSON object. A last line without
    /// its newline is still being written (the writer is another thread) and is left out.
    pub fn audit_records(&self) -> Vec<Value> {
        let text = self.audit_text();
        let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
        complete
            .lines()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits (bounded poll: the writer is asynchronous) for the record of `request_id`, and
    /// checks that there is exactly one.
    pub async fn audit_for(&self, request_id: &str) -> Value {
        let rec = self
            .audit_where(&format!("request_id {request_id}"), |r| {
                r["request_id"] == request_id
            })
            .await;
        let n = self
            .audit_records()
            .iter()
            .filter(|r| r["request_id"] == request_id)
            .count();
        assert_eq!(n, 1, "request {request_id} has {n} audit records");
        rec
    }

    /// Waits (bounded poll) for the first record matching `pred`.
    pub async fn audit_where(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..100 {
            if let Some(r) = self.audit_records().into_iter().find(|r| pred(r)) {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "no audit record for {what} within 2 s; log:\n{}",
            self.audit_text()
        );
    }

    /// Every record matching `pred`, after waiting until there are at least `n`.
    pub async fn audit_count(&self, n: usize, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        for _ in 0..100 {
            let found: Vec<Value> = self
                .audit_records()
                .into_iter()
                .filter(|r| pred(r))
                .collect();
            if found.len() >= n {
                return found;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!(
            "fewer than {n} matching audit records within 2 s; log:\n{}",
            self.audit_text()
        );
    }

    /// Checks a denial as the agent saw it (status, `x-keyward-reason`, problem document) and
    /// its one audit record; returns (problem, record).
    pub async fn assert_denied(&self, resp: &Resp, status: u16, reason: &str) -> (Value, Value) {
        assert_eq!(
            resp.status,
            status,
            "expected {status} {reason}, got {} {:?}: {}",
            resp.status,
            resp.header("x-keyward-reason"),
            resp.body
        );
        assert_eq!(resp.header("x-keyward-reason").as_deref(), Some(reason));
        let ct = resp.header("content-type").unwrap_or_default();
        assert!(
            ct.starts_with("application/problem+json"),
            "content-type {ct}"
        );
        let problem = resp.json();
        self.check_problem(&problem, status, reason);
        let rec = self
            .audit_for(problem["request_id"].as_str().unwrap())
            .await;
        assert_record(&rec);
        assert_eq!(rec["decision"], "deny", "{rec}");
        assert_eq!(rec["reason"], reason, "{rec}");
        assert_eq!(rec["status"], status, "{rec}");
        (problem, rec)
    }

    /// The same for a raw response.
    pub async fn assert_denied_raw(
        &self,
        resp: &RawResp,
        status: u16,
        reason: &str,
    ) -> (Value, Value) {
        assert_eq!(
            resp.status,
            status,
            "expected {status} {reason}, got: {}",
            resp.text()
        );
        assert_eq!(resp.header("x-keyward-reason").as_deref(), Some(reason));
        let problem: Value = serde_json::from_slice(&resp.body)
            .unwrap_or_else(|e| panic!("problem body is not JSON ({e}): {}", resp.text()));
        self.check_problem(&problem, status, reason);
        let rec = self
            .audit_for(problem["request_id"].as_str().unwrap())
            .await;
        assert_record(&rec);
        assert_eq!(rec["decision"], "deny", "{rec}");
        assert_eq!(rec["reason"], reason, "{rec}");
        (problem, rec)
    }

    fn check_problem(&self, problem: &Value, status: u16, reason: &str) {
        assert_eq!(problem["reason"], reason, "{problem}");
        assert_eq!(problem["status"], status, "{problem}");
        assert_eq!(
            problem["type"],
            format!("urn:keyward:reason:{reason}"),
            "{problem}"
        );
        assert!(
            problem["request_id"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
            "{problem}"
        );
        assert!(problem["title"].is_string(), "{problem}");
        assert!(problem["detail"].is_string(), "{problem}");
        // Every problem document has the same keys: `task` is null where none is known.
        let task = problem.get("task");
        assert!(
            task.is_some_and(|t| t.is_string() || t.is_null()),
            "no task: {problem}"
        );
        // (A leak is named before the request is identified: it may have no task.)
        if (status == 403 && reason != "secret_egress") || status == 429 {
            assert!(problem["task"].is_string(), "{problem}");
        }
    }

    // --- leaks --------------------------------------------------------------------------------

    /// No secret (credential values, task tokens, the admin token — and their Basic/base64
    /// spellings) in the audit log, /metrics, keyward's log output, or anything an agent saw.
    pub async fn assert_no_leaks(&self) {
        let metrics = self.metrics().await;
        let audit = self.audit_text();
        let seen = self.agent_seen.lock().unwrap().join("\n");
        let logs = captured_logs();
        let secrets = self.secrets.lock().unwrap().clone();
        for s in &secrets {
            for (place, text) in [
                ("the audit log", &audit),
                ("/metrics", &metrics),
                ("a response seen by an agent", &seen),
                ("keyward's log output", &logs),
            ] {
                assert_absent(s, place, text);
            }
        }
    }
}

/// Fails if `secret` (or its base64 form, as in a Basic header) appears in `text`.
pub fn assert_absent(secret: &str, place: &str, text: &str) {
    assert!(!secret.is_empty());
    assert!(
        !text.contains(secret),
        "a secret leaked into {place}: …{}…",
        excerpt(text, secret)
    );
    let b64 = B64.encode(secret);
    // base64 of a secret inside `user:secret` is offset-dependent; check the common spelling.
    assert!(!text.contains(&b64), "a base64 secret leaked into {place}");
}

fn excerpt(text: &str, needle: &str) -> String {
    let i = text.find(needle).unwrap_or(0);
    let start = text[..i].char_indices().rev().nth(40).map_or(0, |(j, _)| j);
    text[start..(i + needle.len()).min(text.len())].replace(needle, "<SECRET>")
}

/// `Basic base64(user:pass)`.
pub fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", B64.encode(format!("{user}:{pass}")))
}

/// The value of `series` in Prometheus text (exact series text, e.g. `name{a="b"}`).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == series).then(|| value.parse().ok())?
    })
}

/// Every SPEC §7 field; `seq` and `hash` for tamper evidence.
pub const AUDIT_FIELDS: [&str; 24] = [
    "ts",
    "request_id",
    "task",
    "agent",
    "decision",
    "reason",
    "method",
    "scheme",
    "host",
    "port",
    "path",
    "service",
    "capability",
    "route",
    "risk",
    "credential",
    "status",
    "upstream_ms",
    "bytes_up",
    "bytes_down",
    "client",
    "policy_version",
    "seq",
    "hash",
];

/// A record carries every SPEC §7 field, with sane shapes.
pub fn assert_record(rec: &Value) {
    let obj = rec
        .as_object()
        .unwrap_or_else(|| panic!("record is not an object: {rec}"));
    for f in AUDIT_FIELDS {
        assert!(obj.contains_key(f), "audit record lacks `{f}`: {rec}");
    }
    let ts = rec["ts"].as_str().unwrap();
    // 2026-01-02T03:04:05.123456Z
    assert_eq!(ts.len(), 27, "ts {ts}");
    assert!(
        ts.ends_with('Z') && ts.as_bytes()[10] == b'T' && ts.as_bytes()[19] == b'.',
        "ts {ts}"
    );
    assert!(rec["seq"].as_u64().is_some_and(|n| n >= 1), "seq: {rec}");
    assert!(
        rec["hash"].as_str().is_some_and(|h| h.len() == 64),
        "hash: {rec}"
    );
    assert!(
        rec["policy_version"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "{rec}"
    );
    assert!(
        rec["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{rec}"
    );
    if let Some(p) = rec["path"].as_str() {
        assert!(!p.contains('?'), "path carries a query: {rec}");
    }
}
