//! CONNECT and TLS interception: requests inside a tunnel are decided one by one under the
//! tunnel's task, toward a TLS upstream keyward verifies with the service's `ca_file`. Covers
//! h2 toward the agent, refusals at CONNECT (before any TLS and without a leaf), Host/SNI
//! mismatches inside a tunnel, revocation and expiry on a kept-alive connection, streaming,
//! blind passthrough tunnels, and curl as a real-world client.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    bounded, connect_raw, h1_send, h2_send, read_response, tls_over, tunnel_h1, tunnel_h2, Fixture,
    Harness,
};
use futures_util::StreamExt;
use http_body_util::Full;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LEAVES: &str = "keyward_tls_leaf_certs_issued_total";

fn get(path: &str, host: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn intercepted_request_reaches_the_tls_upstream_with_the_credential() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let resp = kw
        .send(
            kw.agent(&task)
                .get(f.tls_url("secure.test", "/repos/acme/web/issues?page=2"))
                .header("x-api-key", "dummy-for-the-sdk"),
        )
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let seen = f.tls.last();
    assert_eq!(seen.path, "/repos/acme/web/issues?page=2");
    assert_eq!(
        seen.header_all("x-api-key"),
        vec![f.creds.tls_token.clone()]
    );
    assert!(seen.header("proxy-authorization").is_none());
    assert!(!resp.body.contains(&f.creds.tls_token));

    let rec = kw
        .audit_where("allowed https request", |r| {
            r["reason"] == "allowed" && r["path"] == "/repos/acme/web/issues"
        })
        .await;
    common::assert_record(&rec);
    assert_eq!(rec["scheme"], "https");
    assert_eq!(rec["host"], "secure.test");
    assert_eq!(rec["port"], f.tls.port());
    assert_eq!(rec["task"], task.id.as_str());
    assert_eq!(rec["service"], "secure");
    assert_eq!(rec["capability"], "secure.read");
    assert_eq!(rec["credential"], "tls_token");
    assert_eq!(kw.metric(LEAVES).await, Some(1.0));
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_side_speaks_http2_when_the_client_offers_it() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let agent = kw.agent(&task);
    for _ in 0..3 {
        let resp = kw
            .send(agent.get(f.tls_url("secure.test", "/repos/acme/web/issues")))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        assert_eq!(resp.version, http::Version::HTTP_2);
    }
    assert_eq!(f.tls.hits(), 3);
    // One tunnel, one leaf, however many streams.
    assert_eq!(kw.metric(LEAVES).await, Some(1.0));
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_through_the_proxy_reaches_the_tls_upstream() {
    let Ok(which) = std::process::Command::new("which").arg("curl").output() else {
        eprintln!("skipped: `which` is not available");
        return;
    };
    if !which.status.success() {
        eprintln!("skipped: curl is not installed");
        return;
    }
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let out = bounded(
        "curl",
        tokio::process::Command::new("curl")
            .args(["-sS", "--max-time", "10", "-D", "-"])
            .arg("--proxy")
            .arg(format!("http://{}", kw.proxy_addr))
            .arg("--proxy-user")
            .arg(format!("{}:{}", task.id, task.token))
            .arg("--cacert")
            .arg(&kw.ca_path)
            .arg("-H")
            .arg("x-api-key: dummy")
            .arg(f.tls_url("secure.test", "/repos/acme/web/issues"))
            .kill_on_drop(true)
            .output(),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    kw.saw(&stdout);
    kw.saw(&stderr);
    assert!(out.status.success(), "curl failed: {stderr}");
    // The proxy's "200 Connection established", then the response from inside the tunnel.
    let last_status = stdout
        .lines()
        .rfind(|l| l.starts_with("HTTP/"))
        .unwrap_or_default();
    assert!(last_status.contains(" 200"), "{stdout}");
    assert_eq!(
        f.tls.last().header_all("x-api-key"),
        vec![f.creds.tls_token.clone()]
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_an_unknown_host_is_refused_before_tls_and_issues_no_leaf() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let (_, head) = connect_raw(
        kw.proxy_addr,
        "nowhere.test:443",
        Some(&Harness::proxy_auth(&task)),
    )
    .await;
    let (_, rec) = kw.assert_denied_raw(&head, 403, "unknown_host").await;
    assert_eq!(rec["method"], "CONNECT");
    assert_eq!(rec["host"], "nowhere.test");
    assert_eq!(rec["port"], 443);
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_without_credentials_gets_407_with_a_basic_challenge() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let (_, head) = connect_raw(
        kw.proxy_addr,
        &format!("secure.test:{}", f.tls.port()),
        None,
    )
    .await;
    kw.assert_denied_raw(&head, 407, "missing_credentials")
        .await;
    assert_eq!(
        head.header("proxy-authenticate").as_deref(),
        Some(r#"Basic realm="keyward""#)
    );
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_to_a_configured_host_outside_the_intent_is_route_not_in_intent() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let (_, head) = connect_raw(
        kw.proxy_addr,
        &format!("secure.test:{}", f.tls.port()),
        Some(&Harness::proxy_auth(&task)),
    )
    .await;
    let (problem, rec) = kw
        .assert_denied_raw(&head, 403, "route_not_in_intent")
        .await;
    assert_eq!(problem["capability"], "secure.read", "{problem}");
    // Decided by host alone: the detail says so, rather than that this capability would allow
    // a request it has not seen.
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("decided at CONNECT"), "{problem}");
    assert!(detail.contains("`secure.read` reaches it"), "{problem}");
    assert_eq!(rec["host"], "secure.test");
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_naming_another_host_inside_the_tunnel_is_host_mismatch() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    // The task may reach both hosts: the mismatch alone must be refused.
    let task = kw.mint("bot", json!(["secure.read", "other.read"])).await;
    let mut conn = tunnel_h1(&f, &task, "secure.test").await;
    let port = f.tls.port();
    for host in [
        format!("other.test:{port}"),
        "other.test".to_string(),
        format!("secure.test:{}", port + 1),
        // No port is https's 443 (RFC 9110 §4.2.2), not this tunnel's: as `:443` would be,
        // and as the plain listener refuses the same omission.
        "secure.test".to_string(),
        "secure.test:443".to_string(),
    ] {
        let resp = h1_send(&mut conn, get("/x", &host)).await;
        let (_, rec) = kw.assert_denied_raw(&resp, 403, "host_mismatch").await;
        assert_eq!(rec["task"], task.id.as_str());
        // Inside the tunnel: https, and the tunnel's service, for reviewers and dashboards.
        assert_eq!(rec["scheme"], "https");
        assert_eq!(rec["service"], "secure");
        kw.saw(&resp.text());
    }
    assert_eq!(f.tls.hits(), 0);
    // The same connection still serves requests for its own host, with its own credential.
    let resp = h1_send(
        &mut conn,
        get("/repos/acme/web/issues", &format!("secure.test:{port}")),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    kw.saw(&resp.text());
    assert_eq!(
        f.tls.last().header_all("x-api-key"),
        vec![f.creds.tls_token.clone()]
    );
    // The CONNECT's record (written when the tunnel closes) names its service too.
    drop(conn);
    let connect = kw
        .audit_where("the CONNECT", |r| {
            r["method"] == "CONNECT" && r["host"] == "secure.test"
        })
        .await;
    assert_eq!(connect["service"], "secure");
    kw.assert_no_leaks().await;
}

fn h2_get(uri: &str, host_header: Option<&str>) -> http::Request<Full<Bytes>> {
    let mut b = http::Request::builder()
        .method("GET")
        .version(http::Version::HTTP_2)
        .uri(uri);
    if let Some(h) = host_header {
        b = b.header("host", h);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_naming_another_host_inside_the_tunnel_is_host_mismatch() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read", "other.read"])).await;
    let mut conn = tunnel_h2(&f, &task, "secure.test").await;
    let resp = h2_send(&mut conn, h2_get(&f.tls_url("other.test", "/x"), None)).await;
    kw.saw(&resp.text());
    kw.assert_denied_raw(&resp, 403, "host_mismatch").await;
    assert_eq!(f.tls.hits(), 0);
    // The right :authority on the same connection is served.
    let ok = h2_send(
        &mut conn,
        h2_get(&f.tls_url("secure.test", "/repos/acme/web/issues"), None),
    )
    .await;
    kw.saw(&ok.text());
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(
        f.tls.last().header_all("x-api-key"),
        vec![f.creds.tls_token.clone()]
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_authority_and_host_that_disagree_are_ambiguous() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read", "other.read"])).await;
    let mut conn = tunnel_h2(&f, &task, "secure.test").await;
    let other = format!("other.test:{}", f.tls.port());
    let resp = h2_send(
        &mut conn,
        h2_get(
            &f.tls_url("secure.test", "/repos/acme/web/issues"),
            Some(&other),
        ),
    )
    .await;
    kw.saw(&resp.text());
    kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_that_looks_like_the_injected_one_is_ambiguous() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut conn = tunnel_h1(&f, &task, "secure.test").await;
    let host = format!("secure.test:{}", f.tls.port());
    let mut req = get("/echo", &host);
    req.headers_mut()
        .insert("x_api_key", http::HeaderValue::from_static("dummy"));
    let resp = h1_send(&mut conn, req).await;
    kw.saw(&resp.text());
    kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_certificate_is_always_verified() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["wrongname.read", "noca.read"])).await;
    let agent = kw.agent(&task);
    // `wrongname.test`: a certificate from a trusted CA that does not name the host.
    // `noca.test`: a certificate naming the host, from a CA the service does not trust.
    for (host, service) in [("wrongname.test", "wrongname"), ("noca.test", "noca")] {
        let resp = kw.send(agent.get(f.tls_url(host, "/echo"))).await;
        assert_eq!(resp.status, 502, "{host}: {}", resp.body);
        let problem = resp.json();
        let rec = kw.audit_for(problem["request_id"].as_str().unwrap()).await;
        common::assert_record(&rec);
        assert_eq!(rec["status"], 502, "{rec}");
        assert_eq!(rec["service"], service, "{rec}");
        let series = format!("keyward_upstream_errors_total{{kind=\"tls\",service=\"{service}\"}}");
        assert_eq!(kw.metric(&series).await, Some(1.0), "{series}");
    }
    // No request ever reached the upstream, so no credential went to an unverified peer.
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_naming_another_host_than_the_connect_is_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read", "other.read"])).await;
    let authority = format!("secure.test:{}", f.tls.port());
    let (tcp, head) =
        connect_raw(kw.proxy_addr, &authority, Some(&Harness::proxy_auth(&task))).await;
    assert_eq!(head.status, 200);
    let tls = tls_over(tcp, "other.test", &kw.ca_pem(), &[b"http/1.1"]).await;
    assert!(
        tls.is_err(),
        "a TLS session for other.test inside a tunnel to secure.test"
    );
    let rec = kw
        .audit_where("the refused tunnel", |r| {
            r["method"] == "CONNECT" && r["reason"] == "host_mismatch"
        })
        .await;
    common::assert_record(&rec);
    assert_eq!(rec["host"], "secure.test");
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_task_is_refused_on_the_next_request_of_a_kept_alive_tunnel() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let authority = format!("secure.test:{}", f.tls.port());
    let (tcp, head) =
        connect_raw(kw.proxy_addr, &authority, Some(&Harness::proxy_auth(&task))).await;
    assert_eq!(head.status, 200, "{}", head.text());
    // Raw bytes over TLS, so the test sees exactly when keyward closes the connection.
    let mut tls = tls_over(tcp, "secure.test", &kw.ca_pem(), &[b"http/1.1"])
        .await
        .unwrap();
    let request = format!("GET /repos/acme/web/issues HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    bounded("write", tls.write_all(request.as_bytes()))
        .await
        .unwrap();
    let first = read_response(&mut tls).await;
    assert_eq!(first.status, 200, "{}", first.text());
    kw.saw(&first.text());
    kw.revoke(&task.id).await;
    bounded("write", tls.write_all(request.as_bytes()))
        .await
        .unwrap();
    let second = read_response(&mut tls).await;
    kw.assert_denied_raw(&second, 407, "task_revoked").await;
    kw.saw(&second.text());
    assert_eq!(f.tls.hits(), 1);
    // The answer says the connection ends (README: "with `Connection: close`"), so a client
    // does not send its next request into a tunnel that is closing...
    assert_eq!(second.header("connection").as_deref(), Some("close"));
    // ...and keyward closes the tunnel after that answer: EOF (or a reset), never more bytes.
    let mut rest = Vec::new();
    let closed = bounded("tunnel close", tls.read_to_end(&mut rest)).await;
    assert!(
        closed.is_err() || rest.is_empty(),
        "bytes after the 407: {:?}",
        String::from_utf8_lossy(&rest)
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_task_is_refused_on_the_next_http2_stream() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let agent = kw.agent(&task);
    let url = f.tls_url("secure.test", "/repos/acme/web/issues");
    let first = kw.send(agent.get(&url)).await;
    assert_eq!(first.status, 200);
    assert_eq!(first.version, http::Version::HTTP_2);
    kw.revoke(&task.id).await;
    let second = kw.send(agent.get(&url)).await;
    kw.assert_denied(&second, 407, "task_revoked").await;
    assert_eq!(f.tls.hits(), 1);
    kw.assert_no_leaks().await;
}

/// The one test that waits on the wall clock: task expiry is wall-clock time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_task_is_refused_inside_an_open_tunnel() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint_with(json!({"agent": "bot", "intent": ["secure.read"], "ttl": "1s"}))
        .await;
    let host = format!("secure.test:{}", f.tls.port());
    let mut conn = tunnel_h1(&f, &task, "secure.test").await;
    let first = h1_send(&mut conn, get("/repos/acme/web/issues", &host)).await;
    assert_eq!(first.status, 200, "{}", first.text());
    kw.saw(&first.text());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let second = h1_send(&mut conn, get("/repos/acme/web/issues", &host)).await;
    kw.assert_denied_raw(&second, 407, "task_expired").await;
    kw.saw(&second.text());
    // A new CONNECT with the expired task is refused at once.
    let (_, head) = connect_raw(kw.proxy_addr, &host, Some(&Harness::proxy_auth(&task))).await;
    kw.assert_denied_raw(&head, 407, "task_expired").await;
    assert_eq!(f.tls.hits(), 1);
    kw.assert_no_leaks().await;
}

/// Reads an SSE response and returns when each event arrived, relative to the first.
async fn event_arrivals(kw: &Harness, rb: reqwest::RequestBuilder) -> Vec<(String, Duration)> {
    let resp = bounded("sse response", rb.send()).await.unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let mut arrivals = Vec::new();
    let mut start: Option<Instant> = None;
    while let Some(chunk) = bounded("sse chunk", stream.next()).await {
        let chunk = chunk.unwrap();
        let now = Instant::now();
        let t0 = *start.get_or_insert(now);
        text.push_str(&String::from_utf8_lossy(&chunk));
        for n in 1..=3 {
            let ev = format!("data: event {n}");
            if text.contains(&ev) && !arrivals.iter().any(|(e, _)| *e == ev) {
                arrivals.push((ev, now - t0));
            }
        }
    }
    kw.saw(&text);
    arrivals
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sent_events_are_delivered_as_they_are_sent() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["secure.read", "plain.issues.read"]))
        .await;
    let agent = kw.agent(&task);
    for url in [
        f.tls_url("secure.test", "/sse"),
        f.plain_url("plain.test", "/sse"),
    ] {
        let arrivals = event_arrivals(kw, agent.get(&url)).await;
        assert_eq!(arrivals.len(), 3, "{url}: {arrivals:?}");
        // The upstream sends the events 200 ms apart; buffering would deliver them together.
        let first_to_last = arrivals[2].1 - arrivals[0].1;
        assert!(
            first_to_last >= Duration::from_millis(300),
            "{url}: events arrived together, so the stream was buffered: {arrivals:?}"
        );
    }
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_host_is_tunnelled_blind() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let authority = format!("127.0.0.1:{}", f.tcp.addr.port());
    let (mut tcp, head) =
        connect_raw(kw.proxy_addr, &authority, Some(&Harness::proxy_auth(&task))).await;
    assert_eq!(head.status, 200, "{}", head.text());
    // Not TLS, not HTTP: bytes flow as they are.
    let payload = b"\x00\x01 not http at all \xff\r\n\r\n";
    bounded("write", tcp.write_all(payload)).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    bounded("read echo", tcp.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(&back, payload);
    drop(tcp);
    let rec = kw
        .audit_where("the passthrough tunnel", |r| r["reason"] == "passthrough")
        .await;
    common::assert_record(&rec);
    assert_eq!(rec["decision"], "tunnel");
    assert_eq!(rec["method"], "CONNECT");
    assert_eq!(rec["host"], "127.0.0.1");
    assert_eq!(rec["task"], task.id.as_str());
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    // A passthrough host that does not answer is a 502, and the log says so (as it does for
    // an intercepted upstream), naming the request.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (_, head) = connect_raw(
        kw.proxy_addr,
        &format!("127.0.0.1:{closed}"),
        Some(&Harness::proxy_auth(&task)),
    )
    .await;
    assert_eq!(head.status, 502, "{}", head.text());
    let rec = kw
        .audit_where("the unreachable passthrough", |r| r["status"] == 502)
        .await;
    let request_id = rec["request_id"].as_str().unwrap();
    let logs = common::captured_logs();
    assert!(
        logs.lines().any(|l| l.contains("WARN")
            && l.contains("passthrough tunnel could not reach its upstream")
            && l.contains(request_id)),
        "{logs}"
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_leaks_after_hostile_tunnel_traffic() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let agent = kw.agent(&task);
    for path in [
        "/reflect-auth",
        "/echo?api_key=x",
        "/repos/acme/web/issues?token=t",
    ] {
        let resp = kw.send(agent.get(f.tls_url("secure.test", path))).await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.body);
        assert!(!resp.body.contains(&f.creds.tls_token));
    }
    let resp = kw
        .send(agent.post(f.tls_url("secure.test", "/echo")).body("a body"))
        .await;
    assert_eq!(resp.status, 200);
    for path in ["/%2e%2e/x", "/nothing", "/repos/a/b/issues/1"] {
        let resp = kw.send(agent.get(f.tls_url("secure.test", path))).await;
        assert!(resp.status >= 400, "{path}: {}", resp.status);
    }
    kw.audit_count(7, |r| r["task"] == task.id.as_str()).await;
    kw.assert_no_leaks().await;
}

/// What a blind tunnel carries cannot be counted, so each one is a request of the budget:
/// a task allowed two requests opens two tunnels, not a third; a tunnel that reached nothing
/// costs nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_blind_tunnel_is_one_request_of_the_budget() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint_with(json!({"agent": "bot", "intent": ["plain.issues.read"], "max_requests": 2}))
        .await;
    let auth = Harness::proxy_auth(&task);
    // Nothing listens there (a port just freed): 502, and the request is given back.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let (_tcp, head) = connect_raw(
        kw.proxy_addr,
        &format!("127.0.0.1:{closed_port}"),
        Some(&auth),
    )
    .await;
    assert_eq!(head.status, 502, "{}", head.text());
    let authority = format!("127.0.0.1:{}", f.tcp.addr.port());
    let mut open = Vec::new();
    for _ in 0..2 {
        let (tcp, head) = connect_raw(kw.proxy_addr, &authority, Some(&auth)).await;
        assert_eq!(head.status, 200, "{}", head.text());
        open.push(tcp);
    }
    let (_tcp, head) = connect_raw(kw.proxy_addr, &authority, Some(&auth)).await;
    kw.assert_denied_raw(&head, 429, "budget_exhausted").await;
    let (_, listed) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(listed["requests_used"], 2, "{listed}");
    drop(open);
}

/// A task whose `max_requests` is spent opens no more tunnels, intercepted or blind: 429
/// `budget_exhausted` at the CONNECT, before a leaf is issued or anything dialled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_refuses_new_tunnels() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint_with(json!({"agent": "bot", "intent": ["secure.read"], "max_requests": 1}))
        .await;
    let resp = kw
        .send(kw.agent(&task).get(f.tls_url("secure.test", "/echo")))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let leaves = kw.metric("keyward_tls_leaf_certs_issued_total").await;
    for authority in [
        format!("secure.test:{}", f.tls.port()),
        format!("127.0.0.1:{}", f.tcp.addr.port()),
    ] {
        let (_tcp, head) =
            connect_raw(kw.proxy_addr, &authority, Some(&Harness::proxy_auth(&task))).await;
        kw.assert_denied_raw(&head, 429, "budget_exhausted").await;
    }
    assert_eq!(
        kw.metric("keyward_tls_leaf_certs_issued_total").await,
        leaves
    );
}

/// Inside an intercepted HTTP/1.1 tunnel too, an agent that half-closes after its request
/// (with TLS `close_notify`, or with a bare TCP end of stream as Python's
/// `SSLSocket.shutdown(SHUT_WR)` sends it) still gets its refusal, recorded as sent, and the
/// tunnel then closes; a request waiting on its upstream is dropped and recorded `client_closed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_in_a_tunnel_reaches_an_agent_that_half_closed() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let host = format!("secure.test:{}", f.tls.port());
    for (round, close_notify) in [true, false].into_iter().enumerate() {
        for (path, status) in [("/nothing/here", 403), ("/stall", 499)] {
            let mut tls = common::tunnel_tls(&f, &task, "secure.test", &[b"http/1.1"]).await;
            let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n");
            tls.write_all(request.as_bytes()).await.unwrap();
            match close_notify {
                true => tls.shutdown().await.unwrap(),
                false => tls.get_mut().0.shutdown().await.unwrap(),
            }
            let mut answer = Vec::new();
            let _ = bounded("the answer, then the close", tls.read_to_end(&mut answer)).await;
            let case = format!("{path}, close_notify: {close_notify}");
            match status {
                499 => assert!(
                    answer.is_empty(),
                    "{case}: {}",
                    String::from_utf8_lossy(&answer)
                ),
                _ => {
                    let resp = common::parse_response(&answer);
                    assert_eq!(resp.status, status, "{case}: {}", resp.text());
                }
            }
            // One record each, saying what the agent got.
            let recs = kw
                .audit_count(round + 1, |r| r["path"] == path && r["method"] == "GET")
                .await;
            assert_eq!(recs.len(), round + 1, "{case}");
            assert_eq!(recs[round]["status"], status, "{case}: {}", recs[round]);
        }
    }
    assert_eq!(
        f.tls
            .seen()
            .iter()
            .filter(|s| s.path.starts_with("/nothing"))
            .count(),
        0
    );
}

/// An agent that ends its side in the middle of its request body (TLS `close_notify`, or a
/// bare TCP end of stream) went away: the upload is recorded `client_closed`, the agent gets
/// nothing, and the tunnel closes at once (not at the idle sweep).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_of_stream_mid_body_ends_the_request_and_the_tunnel_at_once() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    for (round, close_notify) in [true, false].into_iter().enumerate() {
        let mut tls = common::tunnel_tls(&f, &task, "secure.test", &[b"http/1.1"]).await;
        let head = format!(
            "POST /echo HTTP/1.1\r\nHost: secure.test:{}\r\nContent-Length: 100000\r\n\r\n0123456789",
            f.tls.port()
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        // keyward is streaming the body upstream by now; the agent ends its side.
        tokio::time::sleep(Duration::from_millis(300)).await;
        match close_notify {
            true => tls.shutdown().await.unwrap(),
            false => tls.get_mut().0.shutdown().await.unwrap(),
        }
        let mut answer = Vec::new();
        // (`bounded` allows 10 s; the idle sweep would take 90.)
        let _ = bounded("the close", tls.read_to_end(&mut answer)).await;
        let case = format!("close_notify: {close_notify}");
        assert!(
            answer.is_empty(),
            "{case}: {}",
            String::from_utf8_lossy(&answer)
        );
        let recs = kw.audit_count(round + 1, |r| r["path"] == "/echo").await;
        let rec = &recs[round];
        assert_eq!(rec["outcome"], "client_closed", "{case}: {rec}");
        assert_eq!(rec["status"], 499, "{case}: {rec}");
    }
}
