//! Plain HTTP through keyward (absolute-form requests): injection of the real credential,
//! authentication of the agent, every denial reason a plain request can meet, budgets, and the
//! audit record each request leaves. Assertions are on what the upstream received.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{basic, bounded, Fixture, Harness, Task};
use serde_json::{json, Value};

fn auth(task: &Task) -> String {
    Harness::proxy_auth(task)
}

/// A raw absolute-form GET for `path` on `host` of the plain upstream, closing after.
fn raw_get(f: &Fixture, host: &str, path: &str, task: &Task, extra: &str) -> String {
    let port = f.plain.port();
    format!(
        "GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: {}\r\n{extra}Connection: close\r\n\r\n",
        auth(task)
    )
}

/// The head of a raw absolute-form POST to the plain upstream's `/echo` with `framing`
/// (`Content-Length: …` or `Transfer-Encoding: chunked`), followed by `body_start`.
fn raw_post_echo(f: &Fixture, task: &Task, framing: &str, body_start: &str) -> String {
    let port = f.plain.port();
    format!(
        "POST http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\n{framing}\r\n\r\n{body_start}",
        auth(task)
    )
}

/// Waits (bounded) until the plain upstream has seen more than `before` requests.
async fn upstream_saw_more_than(f: &Fixture, before: usize) {
    bounded("upstream sees the request", async {
        while f.plain.hits() <= before {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Writes `request` on a new connection, half-closes it (as `ncat` or `nc -N` do), and reads
/// the answer up to keyward's close.
async fn half_closed_exchange(kw: &Harness, request: &str) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(kw.proxy_addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    tcp.shutdown().await.unwrap();
    let mut answer = Vec::new();
    bounded("the answer, then the close", tcp.read_to_end(&mut answer))
        .await
        .unwrap();
    answer
}

/// The record of the allowed request of `task` to `path`.
async fn allowed_record(kw: &Harness, task: &Task, path: &str) -> Value {
    let rec = kw
        .audit_where(&format!("allowed {path}"), |r| {
            r["task"] == task.id.as_str() && r["path"] == path && r["reason"] == "allowed"
        })
        .await;
    common::assert_record(&rec);
    rec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_request_reaches_upstream_with_header_credential_and_without_proxy_authorization() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&task);
    let resp = kw
        .send(
            agent
                .get(f.plain_url("plain.test", "/repos/acme/web/issues?state=open"))
                .header("authorization", "Bearer dummy-key-for-the-sdk"),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);

    let seen = f.plain.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.path, "/repos/acme/web/issues?state=open");
    assert_eq!(
        seen.header_all("authorization"),
        vec![format!("Bearer {}", f.creds.api_token)],
        "the agent's dummy key is replaced, not merged"
    );
    assert!(seen.header("proxy-authorization").is_none());
    assert!(!seen.headers.iter().any(|(_, v)| v.contains(&task.token)));

    let rec = allowed_record(kw, &task, "/repos/acme/web/issues").await;
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["agent"], "bot");
    assert_eq!(rec["method"], "GET");
    assert_eq!(rec["scheme"], "http");
    assert_eq!(rec["host"], "plain.test");
    assert_eq!(rec["port"], f.plain.port());
    assert_eq!(rec["service"], "plain");
    assert_eq!(rec["capability"], "plain.issues.read");
    assert_eq!(rec["route"], "GET /repos/{owner}/{repo}/issues");
    assert_eq!(rec["risk"], "low");
    assert_eq!(rec["credential"], "api_token");
    assert!(rec["upstream_ms"].is_number(), "{rec}");
    assert!(rec["bytes_down"].as_u64().unwrap() > 0, "{rec}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_credential_replaces_the_agents_parameter() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["query.search"])).await;
    let resp = kw
        .send(
            kw.agent(&task)
                .get(f.plain_url("query.test", "/search?q=rust&api_key=dummy")),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let seen = f.plain.last();
    let (path, query) = seen.path.split_once('?').unwrap();
    assert_eq!(path, "/search");
    let pairs: Vec<&str> = query.split('&').collect();
    assert!(pairs.contains(&"q=rust"), "{query}");
    let keys: Vec<&&str> = pairs.iter().filter(|p| p.starts_with("api_key=")).collect();
    assert_eq!(keys.len(), 1, "exactly one api_key: {query}");
    assert_eq!(*keys[0], format!("api_key={}", f.creds.query_key));

    let rec = allowed_record(kw, &task, "/search").await;
    assert_eq!(rec["credential"], "query_key");
    // The decision is in keyward's own log at debug too, without the query string.
    let id = rec["request_id"].as_str().unwrap();
    let logs = common::captured_logs();
    let line = logs
        .lines()
        .find(|l| l.contains(" DEBUG ") && l.contains(&format!("request_id={id} ")))
        .unwrap_or_else(|| panic!("no debug line for {id}"));
    assert!(line.contains("decision"), "{line}");
    assert!(line.contains("reason=\"allowed\""), "{line}");
    assert!(
        line.contains("path=\"/search\"") && !line.contains("rust"),
        "{line}"
    );
    // A parameter some server reads as `api_key` but injection would leave beside it: refused.
    for query in [
        "API_KEY=dummy",
        "api.key=dummy",
        "api_key[]=dummy",
        "[api_key]=dummy",
        "q=1;api_key=dummy",
        "x=?api_key=dummy",
        "x=%26api_key%3Ddummy",
    ] {
        let resp = kw
            .send(
                kw.agent(&task)
                    .get(f.plain_url("query.test", &format!("/search?{query}"))),
            )
            .await;
        let (problem, _) = kw.assert_denied(&resp, 400, "ambiguous_request").await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("query_lookalike"),
            "{query}: {problem}"
        );
    }
    assert_eq!(f.plain.hits(), 1);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_credential_is_injected_as_the_password() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["basic.whoami"])).await;
    let resp = kw
        .send(
            kw.agent(&task)
                .get(f.plain_url("basic.test", "/whoami"))
                .header("authorization", basic("someone", "dummy")),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(
        f.plain.last().header_all("authorization"),
        vec![basic("bot", &f.creds.basic_pw)]
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_dummy_authorization_headers_are_replaced_by_one_credential() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let resp = kw
        .raw(&raw_get(
            &f,
            "plain.test",
            "/echo",
            &task,
            "Authorization: Bearer dummy-one\r\nAuthorization: Bearer dummy-two\r\n",
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        f.plain.last().header_all("authorization"),
        vec![format!("Bearer {}", f.creds.api_token)]
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reflecting_the_credential_does_not_hand_it_to_the_agent() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&task);
    let reflected = kw
        .send(agent.get(f.plain_url("plain.test", "/reflect-auth")))
        .await;
    assert_eq!(reflected.status, 200);
    // The upstream did get the credential, and did send it back...
    assert_eq!(
        f.plain.last().header("authorization"),
        Some(format!("Bearer {}", f.creds.api_token))
    );
    // ...but neither the body nor the header the agent sees carries it.
    assert!(
        !reflected.body.contains(&f.creds.api_token),
        "{}",
        reflected.body
    );
    let echoed_header = reflected.header("x-echo-auth").unwrap_or_default();
    assert!(
        !echoed_header.contains(&f.creds.api_token),
        "{echoed_header}"
    );
    // The JSON echo lists every header it received, the credential among them.
    let echoed = kw.send(agent.get(f.plain_url("plain.test", "/echo"))).await;
    assert_eq!(echoed.status, 200);
    assert!(!echoed.body.contains(&f.creds.api_token));
    // Base64 of `Bearer <token>` (and of it behind one or two more bytes): the token sits at
    // every alignment inside the encoding, and no line decodes to it.
    let encoded = kw
        .send(agent.get(f.plain_url("plain.test", "/reflect-auth-base64")))
        .await;
    assert_eq!(encoded.status, 200);
    assert_eq!(encoded.body.lines().count(), 6, "{}", encoded.body);
    for line in encoded.body.lines() {
        use base64::Engine as _;
        assert!(line.contains("[redacted]"), "not redacted: {line}");
        // Whatever is left around the marker, decoded from each of its four alignments.
        for part in line.split("[redacted]") {
            let part = part.trim_end_matches('=');
            for skip in 0..4.min(part.len() + 1) {
                let rest = &part[skip..];
                let rest = &rest[..rest.len() - rest.len() % 4];
                for engine in [
                    &base64::engine::general_purpose::STANDARD_NO_PAD,
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                ] {
                    let decoded = engine.decode(rest).unwrap_or_default();
                    assert!(
                        !String::from_utf8_lossy(&decoded).contains(&f.creds.api_token[..6]),
                        "{line}"
                    );
                }
            }
        }
    }
    kw.assert_no_leaks().await;
}

/// Regression: the redactor changes a body's length, but the upstream's exact size hint was
/// passed on, so hyper framed the response with the old Content-Length and dropped the
/// connection before the head went out (every allowed request with a reflected credential).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regression_redacted_body_with_content_length_is_delivered_whole() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let resp = kw
        .raw(&raw_get(&f, "plain.test", "/reflect-auth", &task, ""))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = String::from_utf8(resp.body.clone()).unwrap();
    assert!(
        body.starts_with("you sent: Bearer ") && body.ends_with('\n'),
        "the whole body arrives: {body:?}"
    );
    assert!(!body.contains(&f.creds.api_token));
    if let Some(len) = resp.header("content-length") {
        assert_eq!(len.parse::<usize>().unwrap(), resp.body.len());
    }
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_proxy_credentials_get_407_with_a_basic_challenge() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let anon = kw.agent_builder(None).build().unwrap();
    let resp = kw
        .send(anon.get(f.plain_url("plain.test", "/repos/acme/web/issues")))
        .await;
    let (problem, rec) = kw.assert_denied(&resp, 407, "missing_credentials").await;
    assert_eq!(
        resp.header("proxy-authenticate").as_deref(),
        Some(r#"Basic realm="keyward""#)
    );
    assert!(problem.get("task").is_none_or(Value::is_null), "{problem}");
    assert!(rec["task"].is_null(), "{rec}");
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_token_gets_407_invalid_token() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let real = kw.mint("bot", json!(["plain.issues.read"])).await;
    let forged = Task {
        id: real.id.clone(),
        token: "kw_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA".into(),
    };
    let resp = kw
        .send(
            kw.agent(&forged)
                .get(f.plain_url("plain.test", "/repos/acme/web/issues")),
        )
        .await;
    kw.assert_denied(&resp, 407, "invalid_token").await;
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn valid_token_of_another_task_gets_407_invalid_token() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let a = kw.mint("bot", json!(["plain.issues.read"])).await;
    let b = kw.mint("bot", json!(["plain.issues.read"])).await;
    let crossed = Task {
        id: a.id.clone(),
        token: b.token.clone(),
    };
    let resp = kw
        .send(
            kw.agent(&crossed)
                .get(f.plain_url("plain.test", "/repos/acme/web/issues")),
        )
        .await;
    kw.assert_denied(&resp, 407, "invalid_token").await;
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_proxy_authorization_is_accepted() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let resp = kw
        .raw(&format!(
            "GET http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
            task.token
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(f.plain.last().header("proxy-authorization").is_none());
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_not_in_intent_names_the_capability_that_would_allow_it() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let resp = kw
        .send(
            kw.agent(&task)
                .post(f.plain_url("plain.test", "/repos/acme/web/labels"))
                .body("{}"),
        )
        .await;
    let (problem, rec) = kw.assert_denied(&resp, 403, "route_not_in_intent").await;
    assert_eq!(problem["capability"], "plain.labels.write", "{problem}");
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("plain.labels.write"),
        "{problem}"
    );
    assert_eq!(problem["task"], task.id.as_str());
    assert_eq!(rec["task"], task.id.as_str());
    assert_eq!(rec["agent"], "bot");
    assert_eq!(rec["service"], "plain");
    assert_eq!(rec["path"], "/repos/acme/web/labels");
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_not_allowed_when_the_path_matches_but_the_method_does_not() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let resp = kw
        .send(
            kw.agent(&task)
                .delete(f.plain_url("plain.test", "/repos/acme/web/issues")),
        )
        .await;
    let (_, rec) = kw.assert_denied(&resp, 403, "method_not_allowed").await;
    assert_eq!(rec["capability"], "plain.issues.read", "{rec}");
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraint_mismatch_outside_the_tasks_where() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint(
            "bot",
            json!([{"capability": "plain.issues.read", "where": {"owner": "acme", "repo": "web"}}]),
        )
        .await;
    let agent = kw.agent(&task);
    let ok = kw
        .send(agent.get(f.plain_url("plain.test", "/repos/acme/web/issues/7")))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    for path in ["/repos/evil/web/issues", "/repos/acme/other/issues/7"] {
        let resp = kw.send(agent.get(f.plain_url("plain.test", path))).await;
        let (problem, rec) = kw.assert_denied(&resp, 403, "constraint_mismatch").await;
        assert_eq!(rec["capability"], "plain.issues.read", "{rec}");
        // The agent learns which capability's constraints it broke.
        assert_eq!(problem["capability"], "plain.issues.read", "{problem}");
        assert!(problem["detail"]
            .as_str()
            .unwrap()
            .contains("`plain.issues.read`"));
    }
    assert_eq!(f.plain.hits(), 1);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_host_is_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let resp = kw
        .send(
            kw.agent(&task)
                .get(format!("http://nowhere.test:{}/x", f.plain.port())),
        )
        .await;
    let (problem, rec) = kw.assert_denied(&resp, 403, "unknown_host").await;
    assert_eq!(rec["host"], "nowhere.test");
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("not a configured service"));
    // A configured host on a port (or scheme) its service does not use: the detail says so.
    let wrong_port = f.plain.port().wrapping_add(1);
    for url in [
        format!("http://plain.test:{wrong_port}/echo"),
        format!("http://secure.test:{}/echo", f.tls.port()),
    ] {
        let resp = kw.send(kw.agent(&task).get(&url)).await;
        let (problem, _) = kw.assert_denied(&resp, 403, "unknown_host").await;
        let detail = problem["detail"].as_str().unwrap();
        assert!(
            detail.contains("on another port or scheme"),
            "{url}: {detail}"
        );
    }
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambiguous_paths_are_refused_before_the_upstream() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let paths = [
        "/repos/acme%2Fweb/x/issues",
        "/repos/acme%2fweb/x/issues",
        "/repos/acme/web/../web/issues",
        "/repos/acme/web/%2e%2e/web/issues",
        "/repos/acme/web/%2E%2E/web/issues",
        "/repos/acme/./web/issues",
        "/repos/acme/web/issues/.%2e/x",
        "//repos/acme/web/issues",
        "/repos//acme/web/issues",
        "/repos/acme;x=1/web/issues",
        "/repos/acme/web/issues/..;/x",
        "/repos/acme%5Cweb/issues",
        "/repos/acme%252Fweb/issues",
        "/repos/acme/web/issues%zz",
        "/repos/acme\\web/issues",
    ];
    for path in paths {
        let resp = kw.raw(&raw_get(&f, "plain.test", path, &task, "")).await;
        let (_, rec) = kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
        assert!(!rec["path"].as_str().unwrap().contains('?'));
        // The record still says where the refused request was aimed.
        assert_eq!(rec["host"], "plain.test", "{rec}");
        assert_eq!(rec["port"], f.plain.port(), "{rec}");
        assert_eq!(f.plain.hits(), 0, "{path} reached the upstream");
    }
    // Method overrides are refused too.
    let resp = kw
        .raw(&raw_get(
            &f,
            "plain.test",
            "/repos/acme/web/issues",
            &task,
            "X-HTTP-Method-Override: DELETE\r\n",
        ))
        .await;
    kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
    // An absolute URI whose authority disagrees with Host.
    let port = f.plain.port();
    let resp = kw
        .raw(&format!(
            "GET http://plain.test:{port}/repos/acme/web/issues HTTP/1.1\r\nHost: query.test:{port}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            auth(&task)
        ))
        .await;
    kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
    assert_eq!(f.plain.hits(), 0);
    // Ambiguous requests do not use the budget, and a canonical one still passes.
    let ok = kw
        .raw(&raw_get(
            &f,
            "plain.test",
            "/repos/acme/web/issues",
            &task,
            "",
        ))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_is_exhausted_exactly_at_max_requests_plus_one() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint_with(json!({"agent": "bot", "intent": ["plain.issues.read"], "max_requests": 3}))
        .await;
    let agent = kw.agent(&task);
    // A denial does not count against the budget.
    let denied = kw
        .send(agent.post(f.plain_url("plain.test", "/repos/acme/web/labels")))
        .await;
    assert_eq!(denied.status, 403);
    for i in 0..3 {
        let resp = kw
            .send(agent.get(f.plain_url("plain.test", &format!("/repos/acme/web/issues/{i}"))))
            .await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.body);
    }
    let resp = kw
        .send(agent.get(f.plain_url("plain.test", "/repos/acme/web/issues/3")))
        .await;
    kw.assert_denied(&resp, 429, "budget_exhausted").await;
    assert_eq!(f.plain.hits(), 3);
    let (_, t) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(t["requests_used"], 3, "{t}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_holds_under_concurrent_requests() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint_with(json!({"agent": "bot", "intent": ["plain.issues.read"], "max_requests": 10}))
        .await;
    let agent = kw.agent(&task);
    let requests = (0..20).map(|i| {
        let rb = agent.get(f.plain_url("plain.test", &format!("/repos/acme/web/issues/{i}")));
        async move {
            let resp = rb.send().await.unwrap();
            let status = resp.status().as_u16();
            let reason = resp
                .headers()
                .get("x-keyward-reason")
                .map(|v| v.to_str().unwrap().to_string());
            let _ = resp.bytes().await;
            (status, reason)
        }
    });
    let results = bounded(
        "20 parallel requests",
        futures_util::future::join_all(requests),
    )
    .await;
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let exhausted = results
        .iter()
        .filter(|(s, r)| *s == 429 && r.as_deref() == Some("budget_exhausted"))
        .count();
    assert_eq!((ok, exhausted), (10, 10), "{results:?}");
    assert_eq!(f.plain.hits(), 10);
    kw.audit_count(20, |r| r["task"] == task.id.as_str()).await;
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn high_risk_capability_requires_approval() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.admin"])).await;
    let resp = kw
        .send(
            kw.agent(&task)
                .delete(f.plain_url("plain.test", "/admin/everything")),
        )
        .await;
    let (problem, rec) = kw.assert_denied(&resp, 403, "approval_required").await;
    assert_eq!(rec["capability"], "plain.admin");
    assert_eq!(problem["capability"], "plain.admin", "{problem}");
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("`plain.admin`"));
    assert_eq!(rec["risk"], "high");
    // A task without it is not told to ask for it as if that would do: it would be refused.
    let other = kw.mint("bot", json!(["plain.issues.read"])).await;
    let resp = kw
        .send(
            kw.agent(&other)
                .delete(f.plain_url("plain.test", "/admin/everything")),
        )
        .await;
    let (problem, _) = kw.assert_denied(&resp, 403, "route_not_in_intent").await;
    assert_eq!(problem["capability"], "plain.admin", "{problem}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("needs an approval"), "{problem}");
    assert!(!detail.contains("ask for a task"), "{problem}");
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_carrying_a_real_credential_is_secret_egress() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&task);
    // In a header, even one keyward would replace.
    let resp = kw
        .send(
            agent
                .get(f.plain_url("plain.test", "/repos/acme/web/issues"))
                .header("authorization", format!("Bearer {}", f.creds.api_token)),
        )
        .await;
    let (_, rec) = kw.assert_denied(&resp, 403, "secret_egress").await;
    // Recorded and counted under the service the host belongs to; the record names the
    // credential that leaked (to be rotated), never its value.
    assert_eq!(rec["service"], "plain", "{rec}");
    assert_eq!(rec["credential"], "api_token", "{rec}");
    let counted = kw
        .metric(r#"keyward_decisions_total{agent="bot",capability="",decision="deny",reason="secret_egress",service="plain"}"#)
        .await;
    assert_eq!(counted, Some(1.0));
    // Another service's credential, in another header.
    let resp = kw
        .send(
            agent
                .get(f.plain_url("plain.test", "/echo"))
                .header("x-note", format!("leaked {}", f.creds.tls_token)),
        )
        .await;
    let (_, rec) = kw.assert_denied(&resp, 403, "secret_egress").await;
    assert_eq!(rec["credential"], "tls_token", "{rec}");
    // In the query string.
    let resp = kw
        .send(agent.get(f.plain_url("plain.test", &format!("/echo?k={}", f.creds.query_key))))
        .await;
    let (_, rec) = kw.assert_denied(&resp, 403, "secret_egress").await;
    assert_eq!(rec["credential"], "query_key", "{rec}");
    // keyward's own admin token, which no policy name can be mistaken for.
    let resp = kw
        .send(
            agent
                .get(f.plain_url("plain.test", "/echo"))
                .header("x-note", kw.admin_token.as_str()),
        )
        .await;
    let (_, rec) = kw.assert_denied(&resp, 403, "secret_egress").await;
    assert_eq!(rec["credential"], "(admin token)", "{rec}");
    // Several at once: each is named, the admin token too (each has leaked).
    let resp = kw
        .send(
            agent
                .get(f.plain_url("plain.test", &format!("/echo?k={}", kw.admin_token)))
                .header("x-note", f.creds.api_token.as_str()),
        )
        .await;
    let (_, rec) = kw.assert_denied(&resp, 403, "secret_egress").await;
    assert_eq!(rec["credential"], "api_token, (admin token)", "{rec}");
    // Named even when the request is refused for another reason too (a dot segment).
    let resp = kw
        .send(
            agent
                .get(f.plain_url("plain.test", "/a/%2e%2e/echo"))
                .header("x-note", f.creds.query_key.as_str()),
        )
        .await;
    let (_, rec) = kw.assert_denied(&resp, 403, "secret_egress").await;
    assert_eq!(rec["credential"], "query_key", "{rec}");
    // As the method: named, and the record keeps no more of it than `[redacted]`.
    let method = reqwest::Method::from_bytes(f.creds.api_token.as_bytes()).unwrap();
    let resp = kw
        .send(agent.request(method, f.plain_url("plain.test", "/echo")))
        .await;
    let (_, rec) = kw.assert_denied(&resp, 403, "secret_egress").await;
    assert_eq!(rec["credential"], "api_token", "{rec}");
    assert_eq!(rec["method"], "[redacted]", "{rec}");
    // The operator's log says which secret to rotate, and for which task.
    let logs = common::captured_logs();
    let warned = logs
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("secret_egress") && l.contains(&task.id))
        .collect::<Vec<_>>();
    for name in ["api_token", "tls_token", "query_key", "(admin token)"] {
        assert!(
            warned
                .iter()
                .any(|l| l.contains(&format!("credential={name}"))
                    || l.contains(&format!("credential=\"{name}\""))),
            "no warning names {name}: {warned:#?}"
        );
    }
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

// An agent without a valid token that holds a real secret has it leaked all the same: the
// operator must hear of it (record, metric, log), not see one more 407.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_is_named_even_without_a_valid_token() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let port = f.plain.port();
    let get = |auth: &str, extra: &str| {
        format!(
            "GET http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\n{auth}{extra}Connection: close\r\n\r\n"
        )
    };
    let leak = format!("X-Note: {}\r\n", f.creds.api_token);
    let cases = [
        ("no token", String::new(), leak.clone(), "api_token"),
        (
            "a wrong token",
            format!(
                "Proxy-Authorization: {}\r\n",
                common::basic("t1", "kw_wrong")
            ),
            leak.clone(),
            "api_token",
        ),
        (
            "the admin token as the task token",
            format!(
                "Proxy-Authorization: {}\r\n",
                common::basic("anytask", &kw.admin_token)
            ),
            String::new(),
            "(admin token)",
        ),
        (
            "the admin token as a bearer token",
            format!("Proxy-Authorization: Bearer {}\r\n", kw.admin_token),
            String::new(),
            "(admin token)",
        ),
        (
            "a credential as a bearer token",
            format!("Proxy-Authorization: Bearer {}\r\n", f.creds.tls_token),
            String::new(),
            "tls_token",
        ),
    ];
    for (what, auth, extra, name) in cases {
        let resp = kw.raw(&get(&auth, &extra)).await;
        let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
        assert_eq!(rec["credential"], name, "{what}: {rec}");
        assert_eq!(rec["task"], Value::Null, "{what}: {rec}");
    }
    // A CONNECT too, before it is identified.
    let connect = format!(
        "CONNECT plain.test:443 HTTP/1.1\r\nHost: plain.test:443\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
        common::basic("anytask", &kw.admin_token)
    );
    let resp = kw.raw(&connect).await;
    let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
    assert_eq!(rec["credential"], "(admin token)", "{rec}");
    assert_eq!(rec["method"], "CONNECT", "{rec}");

    // A revoked task's agent that still sends a real key: named, under its task.
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    kw.revoke(&task.id).await;
    let resp = kw
        .raw(&raw_get(&f, "plain.test", "/echo", &task, &leak))
        .await;
    let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
    assert_eq!(rec["task"], task.id.as_str(), "{rec}");
    assert_eq!(rec["credential"], "api_token", "{rec}");
    // Its own token in its place is no leak, and another task's id with it is no leak either.
    let resp = kw.raw(&raw_get(&f, "plain.test", "/echo", &task, "")).await;
    kw.assert_denied_raw(&resp, 407, "task_revoked").await;
    let other = kw.mint("bot", json!(["plain.issues.read"])).await;
    let swapped = format!(
        "Proxy-Authorization: {}\r\n",
        common::basic(&other.id, &task.token)
    );
    let resp = kw.raw(&get(&swapped, "")).await;
    kw.assert_denied_raw(&resp, 407, "invalid_token").await;

    let counted = kw
        .metric(r#"keyward_decisions_total{agent="",capability="",decision="deny",reason="secret_egress",service="plain"}"#)
        .await;
    assert_eq!(counted, Some(5.0));
    // In a head too large to be decided (65,536 bytes by default; the parser reads 16 KiB
    // more), on the plain listener and at CONNECT: the leak is named, not a bare 431.
    let big = format!("X-Big: {}\r\n", "a".repeat(70_000));
    let resp = kw.raw(&get("", &format!("{big}{leak}"))).await;
    let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
    assert_eq!(rec["credential"], "api_token", "{rec}");
    let connect =
        format!("CONNECT plain.test:443 HTTP/1.1\r\nHost: plain.test:443\r\n{big}{leak}\r\n");
    let resp = kw.raw(&connect).await;
    let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
    assert_eq!(rec["credential"], "api_token", "{rec}");
    let logs = common::captured_logs();
    assert!(
        logs.lines().any(|l| l.contains("WARN")
            && l.contains("secret_egress")
            && l.contains("(admin token)")),
        "no warning names the admin token"
    );
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreadable_credential_file_is_credential_unavailable() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["gone.ping"])).await;
    std::fs::remove_file(kw.path("gone-token")).unwrap();
    // keyward re-reads file sources when they change; /readyz reports the credential once it
    // has noticed (a bounded poll on an observable state, not a sleep).
    let mut noticed = false;
    for _ in 0..150 {
        let (status, v) = kw.admin(http::Method::GET, "/readyz", None).await;
        if status == 503
            && v["credentials_unreadable"]
                .as_array()
                .is_some_and(|a| a.iter().any(|n| n == "gone_token"))
        {
            noticed = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(noticed, "/readyz never reported gone_token as unreadable");
    let resp = kw
        .send(kw.agent(&task).get(f.plain_url("gone.test", "/ping")))
        .await;
    let (_, rec) = kw.assert_denied(&resp, 502, "credential_unavailable").await;
    // The record names the credential the operator must fix.
    assert_eq!(rec["credential"], "gone_token", "{rec}");
    assert_eq!(f.plain.hits(), 0);
    let (_, t) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(
        t["requests_used"], 0,
        "a refused request is not charged: {t}"
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_service_host_without_connect_to_is_a_blocked_address() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["local.ping"])).await;
    let resp = kw
        .send(kw.agent(&task).get(f.plain_url("localhost", "/ping")))
        .await;
    let (_, rec) = kw.assert_denied(&resp, 403, "blocked_address").await;
    assert_eq!(rec["host"], "localhost");
    assert_eq!(rec["credential"], Value::Null, "nothing was sent: {rec}");
    assert_eq!(f.plain.hits(), 0, "the loopback upstream was reached");
    let (_, t) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(
        t["requests_used"], 0,
        "a refused request is not charged: {t}"
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_upstream_is_502_recorded_with_the_allowed_request() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["dead.ping"])).await;
    let resp = kw
        .send(
            kw.agent(&task)
                .get(format!("http://dead.test:{}/ping", f.dead_port)),
        )
        .await;
    assert_eq!(resp.status, 502, "{}", resp.body);
    let problem = resp.json();
    // The same problem shape as a denial (SPEC §4.3), naming the task.
    assert_eq!(problem["type"], "urn:keyward:error:upstream_unreachable");
    assert_eq!(problem["reason"], "upstream_unreachable");
    assert_eq!(
        resp.header("x-keyward-reason").as_deref(),
        Some("upstream_unreachable")
    );
    assert_eq!(problem["status"], 502);
    assert_eq!(problem["task"], task.id.as_str());
    assert!(
        problem["title"].is_string() && problem["detail"].is_string(),
        "{problem}"
    );
    let rec = kw.audit_for(problem["request_id"].as_str().unwrap()).await;
    common::assert_record(&rec);
    // Not a decision: the request was allowed, and failed upstream.
    assert_eq!(rec["reason"], "allowed", "{rec}");
    assert_eq!(rec["status"], 502, "{rec}");
    assert_eq!(rec["capability"], "dead.ping", "{rec}");
    let metrics = kw.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("keyward_upstream_errors_total{")
                && l.contains("service=\"dead\"")),
        "{metrics}"
    );
    // And in the service's latency histogram: a failing upstream's requests are not left out.
    let observed = common::metric_value(
        &metrics,
        r#"keyward_request_duration_seconds_count{service="dead"}"#,
    );
    assert_eq!(observed, Some(1.0), "{metrics}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_header_cannot_strip_the_credential() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    for connection in [
        "Connection: authorization\r\n",
        "Connection: Authorization, x-api-key\r\nConnection: keep-alive\r\n",
    ] {
        let extra = format!("Authorization: Bearer dummy\r\n{connection}");
        // raw_get adds `Connection: close`; several Connection lines combine in HTTP/1.1.
        let resp = kw
            .raw(&raw_get(&f, "plain.test", "/echo", &task, &extra))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        let seen = f.plain.last();
        assert_eq!(
            seen.header_all("authorization"),
            vec![format!("Bearer {}", f.creds.api_token)],
            "with {connection:?}"
        );
        let conn = seen.header_all("connection").join(",").to_ascii_lowercase();
        assert!(!conn.contains("authorization"), "{conn}");
    }
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_log_has_one_record_per_request_in_a_verifiable_chain() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&task);
    let anon = kw.agent_builder(None).build().unwrap();
    let mut ids = Vec::new();
    let denials = [
        (anon.get(f.plain_url("plain.test", "/echo")), 407),
        (agent.get(f.plain_url("plain.test", "/nothing")), 403),
        (
            agent.get(format!("http://nowhere.test:{}/", f.plain.port())),
            403,
        ),
    ];
    for (rb, status) in denials {
        let resp = kw.send(rb).await;
        assert_eq!(resp.status, status, "{}", resp.body);
        ids.push(resp.json()["request_id"].as_str().unwrap().to_string());
    }
    let ok = kw.send(agent.get(f.plain_url("plain.test", "/echo"))).await;
    assert_eq!(ok.status, 200);
    let records = kw.audit_count(4, |_| true).await;
    assert_eq!(records.len(), 4, "{records:?}");
    for id in &ids {
        kw.audit_for(id).await;
    }
    for (i, r) in records.iter().enumerate() {
        common::assert_record(r);
        assert_eq!(r["seq"], i as u64 + 1, "seq in write order: {r}");
    }
    let text = kw.audit_text();
    let verified = keyward::audit::verify_chain(std::io::Cursor::new(text.as_bytes()));
    assert!(verified.is_ok(), "{verified:?}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_leaks_after_hostile_plain_requests() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint(
            "bot",
            json!(["plain.issues.read", "query.search", "basic.whoami"]),
        )
        .await;
    let agent = kw.agent(&task);
    for url in [
        f.plain_url("plain.test", "/reflect-auth"),
        f.plain_url("plain.test", "/echo?x=1"),
        f.plain_url("query.test", "/search?api_key=mine"),
        f.plain_url("basic.test", "/whoami"),
        f.plain_url("plain.test", "/repos/acme/web/issues?token=abc"),
    ] {
        let resp = kw.send(agent.get(url)).await;
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
    for path in ["/repos/acme/web/labels", "/%2e%2e/etc/passwd", "/admin/x"] {
        let _ = kw.raw(&raw_get(&f, "plain.test", path, &task, "")).await;
    }
    let anon = kw.agent_builder(None).build().unwrap();
    let _ = kw.send(anon.get(f.plain_url("plain.test", "/echo"))).await;
    kw.audit_count(9, |_| true).await;
    kw.assert_no_leaks().await;
    // The admin token and the task token must not reach the upstream either.
    for seen in f.plain.seen() {
        for (_, v) in &seen.headers {
            assert!(!v.contains(&task.token));
            assert!(!v.contains(&kw.admin_token));
        }
    }
}

/// SPEC §7: a denial's record is written before the denial is sent, so whoever sees the 403
/// can find its record at once (read here without waiting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_denials_record_is_written_before_the_denial_is_sent() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&task);
    for i in 0..20 {
        let resp = kw
            .send(agent.get(f.plain_url("plain.test", &format!("/nothing/{i}"))))
            .await;
        assert_eq!(resp.status, 403, "{}", resp.body);
        let id = resp.json()["request_id"].as_str().unwrap().to_string();
        assert!(
            kw.audit_text()
                .contains(&format!("\"request_id\":\"{id}\"")),
            "denial {i} was answered before its record was written"
        );
    }
}

/// SPEC §7: an allowed request whose agent hangs up before the upstream answers still leaves
/// its one record (outcome `client_closed`, status 499) and is counted, and the task's
/// counters say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_hanging_up_before_the_answer_still_leaves_a_record() {
    use tokio::io::AsyncWriteExt;
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let mut tcp = tokio::net::TcpStream::connect(kw.proxy_addr).await.unwrap();
    // With a body, which reaches the upstream whole before the agent goes.
    let req = raw_get(&f, "plain.test", "/slow", &task, "Content-Length: 10\r\n");
    tcp.write_all(format!("{req}0123456789").as_bytes())
        .await
        .unwrap();
    // The upstream takes 600 ms; hang up once it has the request.
    upstream_saw_more_than(&f, 0).await;
    drop(tcp);
    let rec = kw
        .audit_where("the hung-up request", |r| r["path"] == "/slow")
        .await;
    common::assert_record(&rec);
    assert_eq!(rec["decision"], "allow", "{rec}");
    assert_eq!(rec["reason"], "allowed", "{rec}");
    assert_eq!(rec["outcome"], "client_closed", "{rec}");
    assert_eq!(rec["status"], 499, "{rec}");
    assert_eq!(rec["task"], task.id.as_str(), "{rec}");
    assert_eq!(rec["bytes_up"], 10, "the body sent is counted: {rec}");
    let counted = kw
        .metric(r#"keyward_decisions_total{agent="bot",capability="plain.issues.read",decision="allow",reason="allowed",service="plain"}"#)
        .await;
    assert_eq!(counted, Some(1.0));
    let (_, listed) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(listed["requests_used"], 1, "{listed}");
}

/// A client that half-closes after its request (`ncat`, `nc -N`, `socat`, a script's
/// `shutdown(SHUT_WR)`) still gets its refusal, whose record says it was sent; the connection
/// closes after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_reaches_an_agent_that_half_closed_after_its_request() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let get = |path: &str, auth: &str| {
        format!(
            "GET http://plain.test:{port}{path} HTTP/1.1\r\nHost: plain.test:{port}\r\n{auth}\r\n"
        )
    };
    let with_token = format!("Proxy-Authorization: {}\r\n", auth(&task));
    for (request, status, reason) in [
        (get("/repos/a/b/issues", ""), 407, "missing_credentials"),
        (
            get("/repos/a/b/labels", &with_token),
            403,
            "route_not_in_intent",
        ),
        (
            get("/repos/a/../b/issues", &with_token),
            400,
            "ambiguous_request",
        ),
    ] {
        let answer = half_closed_exchange(kw, &request).await;
        let resp = common::parse_response(&answer);
        assert_eq!(resp.status, status, "{reason}: {}", resp.text());
        assert_eq!(resp.header("x-keyward-reason").as_deref(), Some(reason));
        let id = serde_json::from_slice::<Value>(&resp.body).unwrap()["request_id"].clone();
        let rec = kw.audit_where(reason, |r| r["request_id"] == id).await;
        assert_eq!(rec["status"], status, "{rec}");
    }
    assert_eq!(f.plain.hits(), 0);
}

/// A request forwarded upstream whose agent then closes its side is dropped at once (the
/// agent is taken as gone, as hyper, nginx and squid take it): no answer, one record
/// (`client_closed`, 499).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allowed_request_whose_agent_half_closes_is_dropped_as_gone() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let mut tcp = tokio::net::TcpStream::connect(kw.proxy_addr).await.unwrap();
    let request = format!(
        "GET http://plain.test:{port}/slow HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\n\r\n",
        auth(&task)
    );
    tcp.write_all(request.as_bytes()).await.unwrap();
    // The upstream takes 600 ms; half-close once it has the request.
    upstream_saw_more_than(&f, 0).await;
    tcp.shutdown().await.unwrap();
    let mut answer = Vec::new();
    bounded("the close", tcp.read_to_end(&mut answer))
        .await
        .unwrap();
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    let rec = kw
        .audit_where("the dropped request", |r| r["path"] == "/slow")
        .await;
    assert_eq!(rec["outcome"], "client_closed", "{rec}");
    assert_eq!(rec["status"], 499, "{rec}");
    assert_eq!(kw.audit_count(1, |r| r["path"] == "/slow").await.len(), 1);
}

/// A passthrough CONNECT whose agent ends its side while keyward still dials is dropped at
/// once: nothing answered, recorded `client_closed`, its request given back to the budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passthrough_connect_whose_agent_leaves_while_dialling_is_dropped() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint_with(json!({"agent": "bot", "intent": ["plain.issues.read"], "max_requests": 5}))
        .await;
    // A listener that accepts nothing, its one queue place taken: further SYNs are dropped,
    // and a dial to it waits (for `connect_timeout`, 10 s).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(0).unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut queued = Vec::new();
    for _ in 0..2 {
        let connect = tokio::net::TcpStream::connect(("127.0.0.1", port));
        if let Ok(Ok(s)) =
            tokio::time::timeout(std::time::Duration::from_millis(300), connect).await
        {
            queued.push(s);
        }
    }
    let request = format!(
        "CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nProxy-Authorization: {}\r\n\r\n",
        auth(&task)
    );
    let started = std::time::Instant::now();
    let answer = half_closed_exchange(kw, &request).await;
    assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    let rec = kw
        .audit_where("the dropped CONNECT", |r| r["method"] == "CONNECT")
        .await;
    assert_eq!(rec["reason"], "passthrough", "{rec}");
    assert_eq!(rec["outcome"], "client_closed", "{rec}");
    let (_, listed) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(listed["requests_used"], 0, "{listed}");
    drop((listener, queued));
}

/// An agent that goes away in the middle of its request body, closing its connection or only
/// its sending side, is recorded as gone (`client_closed`, 499), not as one that sent a
/// malformed body (`agent_body_error`), and its connection is closed at once (not left to the
/// idle sweep, holding its task's place).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_hanging_up_mid_body_is_recorded_as_gone() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let open = r#"keyward_connections_open{kind="http"}"#;
    for half_close in [false, true] {
        let mut tcp = tokio::net::TcpStream::connect(kw.proxy_addr).await.unwrap();
        let head = raw_post_echo(&f, &task, "Content-Length: 100000", "0123456789");
        tcp.write_all(head.as_bytes()).await.unwrap();
        // keyward is streaming the body upstream by now; the agent goes.
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        let mut answer = Vec::new();
        if half_close {
            tcp.shutdown().await.unwrap();
            bounded("the close", tcp.read_to_end(&mut answer))
                .await
                .unwrap();
        } else {
            drop(tcp);
        }
        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
        let recs = kw
            .audit_count(usize::from(half_close) + 1, |r| r["path"] == "/echo")
            .await;
        let rec = recs.last().unwrap();
        common::assert_record(rec);
        assert_eq!(rec["outcome"], "client_closed", "{rec}");
        assert_eq!(rec["status"], 499, "{rec}");
        assert_eq!(rec["bytes_up"], 10, "{rec}");
        assert_eq!(
            kw.metric_settled(open, 0.0).await,
            Some(0.0),
            "half-close: {half_close}"
        );
    }
}

/// An agent that half-closes after its request, whose upstream cannot be reached, gets what
/// its record says: the 502, or (when its end of stream came while keyward was still dialling)
/// nothing, recorded `client_closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_closed_agent_gets_what_its_record_says() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["dead.ping"])).await;
    let dead = f.dead_port;
    for round in 0..20 {
        let request = format!(
            "GET http://dead.test:{dead}/ping?round={round} HTTP/1.1\r\nHost: dead.test:{dead}\r\nProxy-Authorization: {}\r\n\r\n",
            auth(&task)
        );
        let answer = half_closed_exchange(kw, &request).await;
        let recs = kw.audit_count(round + 1, |r| r["path"] == "/ping").await;
        let rec = recs.last().unwrap();
        match answer.is_empty() {
            true => assert_eq!(rec["status"], 499, "round {round}: nothing came, but {rec}"),
            false => {
                let resp = common::parse_response(&answer);
                assert_eq!(rec["status"], resp.status, "round {round}: {rec}");
                assert_eq!(resp.status, 502, "{}", resp.text());
            }
        }
    }
}

/// Revoking a task stops what it has out at once: an upload still being sent goes no further
/// (the upstream never gets the whole write), and a request waiting on its upstream gets the
/// 407 instead of the answer. Each is recorded as the allowed request it was, cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_task_cuts_its_upload_and_withholds_a_pending_answer() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let mut tcp = tokio::net::TcpStream::connect(kw.proxy_addr).await.unwrap();
    let framing = "Transfer-Encoding: chunked\r\nConnection: close";
    let head = raw_post_echo(&f, &task, framing, "5\r\nfirst\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    kw.revoke(&task.id).await;
    // The agent goes on writing; none of it reaches the upstream as a whole request.
    let _ = tcp.write_all(b"6\r\nsecond\r\n0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = bounded("the answer", tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 407"), "{answer}");
    assert!(answer.contains("task_revoked"), "{answer}");
    // (The echo upstream notes a request once its body ends, whole or cut.)
    upstream_saw_more_than(&f, 0).await;
    let seen = f.plain.last();
    assert!(
        !String::from_utf8_lossy(&seen.body).contains("second"),
        "the upstream got the upload's rest: {:?}",
        seen.body
    );
    let rec = kw
        .audit_where("the cut upload", |r| r["path"] == "/echo")
        .await;
    common::assert_record(&rec);
    assert_eq!(rec["decision"], "allow", "{rec}");
    assert_eq!(rec["outcome"], "task_revoked", "{rec}");
    assert_eq!(rec["status"], 407, "{rec}");

    // An upload paused when its task is revoked (no frame comes to be cut): 407 at once, not
    // the upstream's timeout.
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let mut tcp = tokio::net::TcpStream::connect(kw.proxy_addr).await.unwrap();
    let head = raw_post_echo(&f, &task, framing, "5\r\nfirst\r\n");
    tcp.write_all(head.as_bytes()).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    kw.revoke(&task.id).await;
    let mut answer = Vec::new();
    let _ = bounded("the answer", tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 407"), "{answer}");

    // A request waiting on a slow upstream when its task is revoked.
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let before = f.plain.hits();
    let mut tcp = tokio::net::TcpStream::connect(kw.proxy_addr).await.unwrap();
    tcp.write_all(raw_get(&f, "plain.test", "/slow", &task, "").as_bytes())
        .await
        .unwrap();
    upstream_saw_more_than(&f, before).await;
    kw.revoke(&task.id).await;
    let mut answer = Vec::new();
    let _ = bounded("the answer", tcp.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 407"), "{answer}");
    assert!(!answer.contains("slow answer"), "{answer}");
    // A 407 ends the connection it is sent on (README), as one for a new request does.
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "{answer}"
    );
    let rec = kw
        .audit_where("the withheld answer", |r| r["path"] == "/slow")
        .await;
    assert_eq!(rec["outcome"], "task_revoked", "{rec}");
    assert_eq!(rec["status"], 407, "{rec}");
    kw.assert_no_leaks().await;
}

/// `requests_denied` in the admin API counts every denial of the task, on the plain listener
/// as in tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_counts_a_tasks_denials() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint_with(json!({"agent": "bot", "intent": ["plain.issues.read"], "max_requests": 1}))
        .await;
    let agent = kw.agent(&task);
    let ok = kw.send(agent.get(f.plain_url("plain.test", "/echo"))).await;
    assert_eq!(ok.status, 200);
    for (path, status) in [("/nothing", 403), ("/echo", 429), ("/nothing/2", 403)] {
        let resp = kw.send(agent.get(f.plain_url("plain.test", path))).await;
        assert_eq!(resp.status, status, "{path}: {}", resp.body);
    }
    let (_, listed) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(listed["requests_used"], 1, "{listed}");
    assert_eq!(listed["requests_denied"], 3, "{listed}");
}

/// A 407's record still names the destination (host, port), for absolute-form requests and
/// CONNECTs alike; and a task token sent as the method never reaches the record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_authentication_records_name_the_destination_and_never_a_token() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let other = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let resp = kw
        .raw(&format!(
            "GET http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(resp.status, 407);
    let rec = kw
        .audit_where("407 plain", |r| r["reason"] == "missing_credentials")
        .await;
    assert_eq!(rec["host"], "plain.test", "{rec}");
    assert_eq!(rec["port"], port, "{rec}");
    let resp = kw
        .raw("CONNECT secure.test:443 HTTP/1.1\r\nHost: secure.test:443\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(resp.status, 407);
    let rec = kw
        .audit_where("407 connect", |r| {
            r["reason"] == "missing_credentials" && r["method"] == "CONNECT"
        })
        .await;
    assert_eq!(rec["host"], "secure.test", "{rec}");
    assert_eq!(rec["port"], 443, "{rec}");
    // Any token is a method to the parser: another task's token sent as one.
    for auth_header in [
        format!("Proxy-Authorization: {}\r\n", auth(&task)),
        String::new(),
    ] {
        let resp = kw
            .raw(&format!(
                "{} http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\n{auth_header}Connection: close\r\n\r\n",
                other.token
            ))
            .await;
        assert!(resp.status == 403 || resp.status == 407, "{}", resp.text());
    }
    kw.audit_count(4, |_| true).await;
    assert!(
        !kw.audit_text().contains(&other.token),
        "a task token sent as the method reached the audit log"
    );
    kw.assert_no_leaks().await;
}

/// An upstream that answers a large upload early (413) and closes without reading the rest
/// resets the connection under keyward's writes: the agent still gets the upstream's answer,
/// not a 502, whichever of the reset and the answer keyward meets first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_answer_to_an_upload_reaches_the_agent_though_the_upstream_reset() {
    use tokio::io::AsyncWriteExt;
    // Reads each request's head only, answers 413 and closes with the body unread (a reset).
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = upstream.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = upstream.accept().await else {
                return;
            };
            tokio::spawn(async move {
                if !common::read_request_head(&mut tcp).await {
                    return;
                }
                let _ = tcp
                    .write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 9\r\nConnection: close\r\n\r\ntoo large")
                    .await;
            });
        }
    });
    let f = Fixture::start_with(|p| common::plain_services_at(p, port)).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    const BODY: usize = 32 << 20;
    for round in 0..16 {
        let mut tcp = tokio::net::TcpStream::connect(kw.proxy_addr).await.unwrap();
        let head = format!(
            "POST http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nContent-Length: {BODY}\r\n\r\n",
            auth(&task)
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        let (mut rd, mut wr) = tcp.into_split();
        // The agent keeps uploading (as curl does) until keyward stops reading.
        let upload = tokio::spawn(async move {
            let chunk = vec![b'x'; 64 << 10];
            let mut sent = 0;
            while sent < BODY {
                if wr.write_all(&chunk).await.is_err() {
                    return;
                }
                sent += chunk.len();
            }
        });
        let answer = common::read_response(&mut rd).await;
        assert_eq!(
            answer.status,
            413,
            "round {round}: the agent got {} instead of the upstream's 413",
            answer.text()
        );
        upload.abort();
    }
    server.abort();
}

/// A GET may carry a body (search APIs take one): it reaches the upstream whole, chunked or
/// with a length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_with_a_body_reaches_the_upstream_with_it() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    for (framing, body) in [
        ("Transfer-Encoding: chunked\r\n", "5\r\nhello\r\n0\r\n\r\n"),
        ("Content-Length: 5\r\n", "hello"),
    ] {
        let req = raw_get(&f, "plain.test", "/echo", &task, framing) + body;
        let resp = kw.raw(&req).await;
        assert_eq!(resp.status, 200, "{framing}: {}", resp.text());
        let seen = f.plain.last();
        assert_eq!(seen.method, "GET");
        assert_eq!(seen.body, b"hello", "{framing}: {seen:?}");
    }
}
