//! Framing: message boundaries the agent or the upstream could make two parties read
//! differently — CL+TE, duplicate or malformed Content-Length, chunked edge cases, obs-fold,
//! pipelined requests (each decided on its own), an upstream that sends more than one response
//! (no desync reaches the next request), upstream pools per service, and HTTP/2 streams.

use bytes::Bytes;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{
    bounded, h2_send, http_response, parse_response, plain_fixture_at, plain_services_at, Fixture,
    Harness, RawResp, Reply, ScriptUpstream,
};
use crate::headers::{allowed_record, get, h2_req, raw_req, raw_req_at, tunnel_h1, tunnel_h2};

/// Writes `bytes` on a fresh connection to the proxy and reads until keyward closes it.
async fn exchange(f: &Fixture, bytes: &[u8]) -> Vec<u8> {
    let mut tcp = bounded("connect", TcpStream::connect(f.kw.proxy_addr))
        .await
        .unwrap();
    bounded("write", tcp.write_all(bytes)).await.unwrap();
    let mut buf = Vec::new();
    // A reset after the answer is still an answer.
    let _ = bounded("read to EOF", tcp.read_to_end(&mut buf)).await;
    f.kw.saw(&String::from_utf8_lossy(&buf));
    buf
}

/// Splits a stream of HTTP/1.1 responses (Content-Length or chunked bodies).
fn parse_many(mut buf: &[u8]) -> Vec<RawResp> {
    let mut out = Vec::new();
    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = parse_response(&buf[..end + 4]);
        let rest = &buf[end + 4..];
        let used = if head
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"))
        {
            rest.windows(5)
                .position(|w| w == b"0\r\n\r\n")
                .map_or(rest.len(), |i| i + 5)
        } else {
            head.header("content-length")
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0)
                .min(rest.len())
        };
        out.push(parse_response(&buf[..end + 4 + used]));
        buf = &rest[used..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_with_transfer_encoding_cannot_smuggle_a_request_upstream() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["plain.issues.read", "plain.admin"]))
        .await;
    let port = f.plain.port();
    let smuggled = format!(
        "DELETE http://plain.test:{port}/admin/x HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
        crate::common::Harness::proxy_auth(&task)
    );
    for te in ["chunked", "identity, chunked"] {
        let body = format!("0\r\n\r\n{smuggled}");
        let head = raw_req(
            &f,
            "POST",
            "plain.test",
            "/echo",
            &task,
            &format!(
                "Content-Length: {}\r\nTransfer-Encoding: {te}\r\n",
                body.len()
            ),
        );
        // Kept alive: whatever follows the chunked body is read as keyward's next request.
        let head = head.replace("Connection: close\r\n", "");
        let buf = exchange(&f, format!("{head}{body}").as_bytes()).await;
        let resps = parse_many(&buf);
        assert!(!resps.is_empty(), "no answer for TE {te:?}");
        if te == "chunked" {
            assert_eq!(resps[0].status, 200, "{}", resps[0].text());
        } else {
            // A coding besides `chunked` is refused whole (and the connection closed).
            kw.assert_denied_raw(&resps[0], 400, "ambiguous_request")
                .await;
            assert_eq!(resps.len(), 1);
        }
        // If the connection was not closed, the smuggled request was decided on its own.
        for r in &resps[1..] {
            kw.assert_denied_raw(r, 403, "approval_required").await;
        }
    }
    // Whatever keyward made of it, the upstream never saw a DELETE, not even inside a body,
    // and never more requests than keyward recorded as allowed.
    for seen in f.plain.seen() {
        assert_ne!(seen.method, "DELETE");
        assert!(seen.path.starts_with("/echo"), "{}", seen.path);
        assert!(
            !String::from_utf8_lossy(&seen.body).contains("DELETE"),
            "smuggled bytes reached the upstream as a body"
        );
    }
    // Every upstream hit has its allowed record (written when its response ends).
    let hits = f.plain.hits();
    let allowed = kw
        .audit_count(hits, |r| {
            r["task"] == task.id.as_str() && r["reason"] == "allowed"
        })
        .await;
    assert_eq!(allowed.len(), hits, "{hits} hits");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conflicting_or_malformed_content_length_is_refused_before_the_upstream() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    for cl in [
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5, 6\r\n",
        "Content-Length: +5\r\n",
        "Content-Length: -5\r\n",
        "Content-Length: 0x5\r\n",
        "Content-Length: 5 5\r\n",
        "Content-Length: 99999999999999999999999\r\n",
        "Content-Length: 5\r\nTransfer-Encoding: identity\r\n",
        "Transfer-Encoding: chunked, identity\r\n",
        "Transfer-Encoding: xchunked\r\n",
    ] {
        let req = format!(
            "{}hello",
            raw_req(&f, "POST", "plain.test", "/echo", &task, cl)
        );
        let buf = exchange(&f, req.as_bytes()).await;
        let resp = parse_response(&buf);
        assert_eq!(resp.status, 400, "{cl:?}: {}", resp.text());
    }
    // An obs-folded header line, and a header name with a space before the colon.
    for extra in ["X-Folded: a\r\n b\r\n", "X-Spaced : a\r\n"] {
        let buf = exchange(
            &f,
            raw_req(&f, "GET", "plain.test", "/echo", &task, extra).as_bytes(),
        )
        .await;
        assert_eq!(parse_response(&buf).status, 400, "{extra:?}");
    }
    // Transfer-Encoding is HTTP/1.1 only.
    let port = f.plain.port();
    let req = format!(
        "POST http://plain.test:{port}/echo HTTP/1.0\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        crate::common::Harness::proxy_auth(&task)
    );
    let buf = exchange(&f, req.as_bytes()).await;
    assert_eq!(parse_response(&buf).status, 400);
    assert_eq!(
        f.plain.hits(),
        0,
        "a malformed request reached the upstream"
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_chunked_bodies_never_reach_the_upstream_whole() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let cases: [(&str, &str); 5] = [
        ("bad-size", "zz\r\nhello\r\n0\r\n\r\n"),
        ("overflow", "fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n"),
        ("negative", "-5\r\nhello\r\n0\r\n\r\n"),
        ("no-crlf-after-data", "5\r\nhelloXX0\r\n\r\n"),
        ("short-data", "9\r\nhello\r\n0\r\n\r\n"),
    ];
    for (name, body) in cases {
        let head = raw_req(
            &f,
            "POST",
            "plain.test",
            &format!("/echo?case={name}"),
            &task,
            "Transfer-Encoding: chunked\r\n",
        );
        let buf = exchange(&f, format!("{head}{body}").as_bytes()).await;
        if !buf.is_empty() {
            // The agent's body is at fault: 400, never a 502 that blames the upstream.
            let resp = parse_response(&buf);
            assert_eq!(resp.status, 400, "{name}: {}", resp.text());
        }
    }
    assert_eq!(
        kw.metric(r#"keyward_upstream_errors_total{kind="protocol",service="plain"}"#)
            .await
            .unwrap_or(0.0),
        0.0,
        "an agent's malformed body was counted as an upstream error"
    );
    for seen in f.plain.seen() {
        assert!(
            seen.body.is_empty(),
            "{}: the upstream got a body from a malformed chunked stream: {:?}",
            seen.path,
            String::from_utf8_lossy(&seen.body)
        );
    }
    // A chunk extension and a last-chunk with trailers are legal: the body arrives whole.
    let head = raw_req(
        &f,
        "POST",
        "plain.test",
        "/echo?case=extension",
        &task,
        "Transfer-Encoding: chunked\r\n",
    );
    let buf = exchange(
        &f,
        format!("{head}5;name=value\r\nhello\r\n0\r\nX-Trailer: t\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(parse_response(&buf).status, 200);
    // By path, not `last()`: the upstream may log a malformed case's aborted exchange after it
    // logged this one.
    let extension = f
        .plain
        .seen()
        .into_iter()
        .find(|s| s.path.contains("case=extension"))
        .expect("the extension case reached the upstream");
    assert_eq!(extension.body, b"hello");
    // A body whose final chunk never comes: the agent hangs up mid-body.
    let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
    let head = raw_req(
        &f,
        "POST",
        "plain.test",
        "/echo?case=unterminated",
        &task,
        "Transfer-Encoding: chunked\r\n",
    );
    bounded(
        "write",
        tcp.write_all(format!("{head}5\r\nhello\r\n").as_bytes()),
    )
    .await
    .unwrap();
    drop(tcp);
    // Each request has exactly one record, whether it completed or broke.
    let n = f.plain.hits();
    let recs = kw
        .audit_count(n, |r| r["task"] == task.id.as_str() && r["path"] == "/echo")
        .await;
    let mut ids = BTreeSet::new();
    for r in &recs {
        assert!(ids.insert(r["request_id"].as_str().unwrap().to_string()));
    }
    for seen in f.plain.seen() {
        if seen.path.ends_with("case=unterminated") {
            assert!(seen.body.is_empty(), "an unterminated body was completed");
        }
    }
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_each_decided_on_their_own() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let keep = |method: &str, path: &str| {
        raw_req(&f, method, "plain.test", path, &task, "").replace("Connection: close\r\n", "")
    };
    let pipeline = [
        keep("GET", "/echo"),
        keep("DELETE", "/admin/x"),
        keep("GET", "/repos/acme/web/pulls"),
        keep("POST", "/repos/acme/web/labels"),
        raw_req(&f, "GET", "plain.test", "/repos/acme/web/issues", &task, ""),
    ]
    .concat();
    let buf = exchange(&f, pipeline.as_bytes()).await;
    let resps = parse_many(&buf);
    let got: Vec<(u16, Option<String>)> = resps
        .iter()
        .map(|r| (r.status, r.header("x-keyward-reason")))
        .collect();
    assert_eq!(
        got,
        vec![
            (200, None),
            (403, Some("route_not_in_intent".to_string())),
            (403, Some("route_not_in_intent".to_string())),
            (403, Some("route_not_in_intent".to_string())),
            (200, None),
        ],
        "{}",
        String::from_utf8_lossy(&buf)
    );
    for r in &resps[1..4] {
        kw.assert_denied_raw(r, 403, "route_not_in_intent").await;
    }
    // Only the allowed ones reached the upstream, each with the credential.
    let seen = f.plain.seen();
    let paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    assert_eq!(paths, vec!["/echo", "/repos/acme/web/issues"]);
    for s in &seen {
        assert_eq!(
            s.header_all("authorization"),
            vec![format!("Bearer {}", f.creds.api_token)]
        );
    }
    allowed_record(kw, &task, "/echo").await;
    allowed_record(kw, &task, "/repos/acme/web/issues").await;
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_request_after_a_denied_body_is_not_read_as_the_body() {
    // A denied POST's body must not be taken for the next request, nor forwarded.
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("reader", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let inner =
        format!("GET http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\n\r\n");
    let denied = raw_req(
        &f,
        "POST",
        "plain.test",
        "/repos/acme/web/labels",
        &task,
        &format!("Content-Length: {}\r\n", inner.len()),
    )
    .replace("Connection: close\r\n", "");
    let allowed = raw_req(&f, "GET", "plain.test", "/repos/acme/web/issues", &task, "");
    let buf = exchange(&f, format!("{denied}{inner}{allowed}").as_bytes()).await;
    let resps = parse_many(&buf);
    assert!(!resps.is_empty());
    assert_eq!(resps[0].status, 403, "{}", resps[0].text());
    kw.assert_denied_raw(&resps[0], 403, "route_not_in_intent")
        .await;
    // The body (a request without credentials) was never treated as a request: the upstream
    // saw at most the allowed GET, and never `/echo`.
    for s in f.plain.seen() {
        assert_eq!(s.path, "/repos/acme/web/issues");
    }
    if let Some(second) = resps.get(1) {
        assert_eq!(second.status, 200, "{}", second.text());
    }
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sending_two_responses_does_not_answer_the_next_request() {
    let script = ScriptUpstream::start(|req| {
        if req.request_line().contains("/echo?n=1") {
            // One response, then a second nobody asked for, reflecting the credential.
            let auth = req.header("authorization").unwrap_or_default();
            let mut out = http_response("200 OK", &[], b"first");
            out.extend(http_response(
                "200 OK",
                &[],
                format!("stale {auth}").as_bytes(),
            ));
            Reply::bytes(out)
        } else {
            Reply::bytes(http_response("200 OK", &[], b"fresh"))
        }
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    let first = kw
        .raw(&raw_req_at(
            port,
            "GET",
            "plain.test",
            "/echo?n=1",
            &task,
            "",
        ))
        .await;
    assert_eq!(first.status, 200);
    assert_eq!(first.body, b"first");
    for n in 2..5 {
        let resp = kw
            .raw(&raw_req_at(
                port,
                "GET",
                "plain.test",
                &format!("/echo?n={n}"),
                &task,
                "",
            ))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(resp.body, b"fresh", "request {n} got a desynced response");
    }
    assert_eq!(script.hits(), 4);
    assert!(
        script.connections() >= 2,
        "the connection that desynced was reused"
    );
    assert_eq!(f.plain.hits(), 0);
    kw.audit_count(4, |r| {
        r["task"] == task.id.as_str() && r["reason"] == "allowed"
    })
    .await;
    kw.assert_no_leaks().await;
}

/// `Alt-Svc` would invite the agent's client to reach the origin around keyward (HTTP/3 over
/// UDP, another port): it is not relayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alt_svc_is_not_relayed() {
    let script = ScriptUpstream::start(|_| {
        Reply::bytes(http_response(
            "200 OK",
            &["Alt-Svc: h3=\":443\"; ma=86400", "X-Kept: 1"],
            b"ok",
        ))
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    let resp = kw
        .raw(&raw_req_at(port, "GET", "plain.test", "/echo", &task, ""))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-kept").as_deref(), Some("1"));
    assert!(resp.header("alt-svc").is_none());
    kw.assert_no_leaks().await;
}

/// A session an upstream opens for the injected credential (`Set-Cookie`) would give the agent
/// a bearer secret with the credential's authority that outlives the task: it is not relayed on
/// a credentialed answer. A service that injects nothing passes its cookies on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_cookies_for_the_credential_are_not_relayed() {
    let script = ScriptUpstream::start(|_| {
        Reply::bytes(http_response(
            "200 OK",
            &[
                "Set-Cookie: session=derived-from-the-key; Path=/; HttpOnly",
                "set-cookie: second=1",
                "Set-Cookie2: old=1",
                "X-Kept: 1",
            ],
            b"ok",
        ))
    })
    .await;
    let port = script.port();
    let f = Fixture::start_with(|p| {
        plain_services_at(p, port)
            .replacen(
                "services:\n",
                &format!(
                    "services:\n  open:\n    hosts: [open.test]\n    scheme: http\n    port: {port}\n    connect_to: 127.0.0.1:{port}\n"
                ),
                1,
            )
            .replacen(
                "capabilities:\n",
                "capabilities:\n  open.read: {service: open, routes: [GET /echo]}\n",
                1,
            )
            .replacen("capabilities: [plain.issues.read, ", "capabilities: [open.read, plain.issues.read, ", 1)
    })
    .await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", serde_json::json!(["plain.issues.read", "open.read"]))
        .await;
    let resp = kw
        .raw(&raw_req_at(port, "GET", "plain.test", "/echo", &task, ""))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("x-kept").as_deref(), Some("1"));
    assert!(resp.header("set-cookie").is_none(), "{:?}", resp.headers);
    assert!(resp.header("set-cookie2").is_none(), "{:?}", resp.headers);

    let open = kw
        .raw(&raw_req_at(port, "GET", "open.test", "/echo", &task, ""))
        .await;
    assert_eq!(open.status, 200, "{}", open.text());
    assert_eq!(
        open.header("set-cookie").as_deref(),
        Some("session=derived-from-the-key; Path=/; HttpOnly")
    );
    kw.assert_no_leaks().await;
}

/// An upstream that sends a second response late (a response-splitting bug an agent can feed)
/// shifts every later response on its connection by one: if another task's request rode that
/// connection, it would get the first task's chosen bytes and the first task its answer. An
/// HTTP/1 connection carries one task's requests only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_extra_response_never_reaches_another_task() {
    let script = ScriptUpstream::start(|req| {
        let line = req.request_line().to_string();
        let who = line
            .split("who=")
            .nth(1)
            .and_then(|w| w.split(' ').next())
            .unwrap_or("?")
            .to_string();
        if who == "a1" {
            Reply::frames(
                vec![
                    http_response("200 OK", &[], b"for a1"),
                    http_response("200 OK", &[], b"POISON chosen by a"),
                ],
                Duration::from_millis(300),
            )
        } else {
            Reply::bytes(http_response(
                "200 OK",
                &[],
                format!("for {who}").as_bytes(),
            ))
        }
    })
    .await;
    let port = script.port();
    let f = Fixture::start_with(|p| plain_services_at(p, port)).await;
    let kw = &f.kw;
    let a = kw.mint("bot", json!(["plain.issues.read"])).await;
    let b = kw.mint("bot", json!(["plain.issues.read"])).await;
    let get = |task, who: &str| {
        raw_req_at(
            port,
            "GET",
            "plain.test",
            &format!("/echo?who={who}"),
            task,
            "",
        )
    };
    let first = kw.raw(&get(&a, "a1")).await;
    assert_eq!(first.body, b"for a1");
    // B asks while A's connection is idle and the extra response is on its way.
    for n in 1..4 {
        let resp = kw.raw(&get(&b, &format!("b{n}"))).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(
            resp.body,
            format!("for b{n}").as_bytes(),
            "task B got another's response"
        );
    }
    // Once the extra bytes came while the connection was idle, it is not reused either.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let again = kw.raw(&get(&a, "a2")).await;
    assert_eq!(again.body, b"for a2");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_body_longer_than_its_content_length_is_cut_and_not_reused() {
    let script = ScriptUpstream::start(|req| {
        if req.request_line().contains("n=1") {
            let mut out = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfourEXTRA-BYTES".to_vec();
            out.extend(b"\r\n\r\nHTTP/1.1 302 Found\r\nLocation: http://evil.test/\r\n\r\n");
            Reply::bytes(out)
        } else {
            Reply::bytes(http_response("200 OK", &[], b"fresh"))
        }
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    let resp = kw
        .raw(&raw_req_at(
            port,
            "GET",
            "plain.test",
            "/echo?n=1",
            &task,
            "",
        ))
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body, b"four");
    let resp = kw
        .raw(&raw_req_at(
            port,
            "GET",
            "plain.test",
            "/echo?n=2",
            &task,
            "",
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, b"fresh");
    assert!(resp.header("location").is_none());
    assert_eq!(script.connections(), 2);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_pool_connections_are_never_shared_across_services() {
    let script = ScriptUpstream::start(|_| Reply::bytes(http_response("200 OK", &[], b"ok"))).await;
    let port = script.port();
    let f = Fixture::start_with(|p| plain_services_at(p, port)).await;
    let kw = &f.kw;
    let task = kw
        .mint(
            "bot",
            json!([
                "plain.issues.read",
                "gone.ping",
                "basic.whoami",
                "query.search"
            ]),
        )
        .await;
    let agent = kw.agent(&task);
    let urls = [
        format!("http://plain.test:{port}/echo"),
        format!("http://gone.test:{port}/ping"),
        format!("http://basic.test:{port}/whoami"),
        format!("http://query.test:{port}/search?q=1"),
    ];
    for _ in 0..3 {
        for u in &urls {
            let resp = kw.send(agent.get(u)).await;
            assert_eq!(resp.status, 200, "{u}: {}", resp.body);
        }
    }
    assert_eq!(script.hits(), 12);
    // Which credential each upstream connection carried.
    let mut per_conn: BTreeMap<usize, BTreeSet<&str>> = BTreeMap::new();
    let seen = script.seen();
    for s in &seen {
        let what = if s.request_line().contains(&f.creds.query_key) {
            "query_key"
        } else {
            match s.header("authorization") {
                Some(a) if a.contains(&f.creds.api_token) => "api_token",
                Some(a) if a.contains(&f.creds.gone_token) => "gone_token",
                Some(a) if a.starts_with("Basic ") => "basic_pw",
                other => panic!("no credential on {}: {other:?}", s.request_line()),
            }
        };
        per_conn.entry(s.conn).or_default().insert(what);
    }
    for (conn, creds) in &per_conn {
        assert_eq!(creds.len(), 1, "connection {conn} carried {creds:?}");
    }
    assert_eq!(
        per_conn.values().flatten().collect::<BTreeSet<_>>().len(),
        4
    );
    // Pooling does happen (within a service): fewer connections than requests.
    assert!(script.connections() < 12, "{}", script.connections());
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_request_trailers_cannot_smuggle_a_credential_header() {
    let script = ScriptUpstream::start(|_| Reply::bytes(http_response("200 OK", &[], b"ok"))).await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    let head = raw_req_at(
        port,
        "POST",
        "plain.test",
        "/echo",
        &task,
        "Transfer-Encoding: chunked\r\nTrailer: Authorization, X-Api-Key\r\nTE: trailers\r\n",
    );
    let body = "5\r\nhello\r\n0\r\nAuthorization: Bearer dummy-trailer\r\nX-Api-Key: dummy-trailer\r\n\r\n";
    let buf = exchange(&f, format!("{head}{body}").as_bytes()).await;
    assert_eq!(parse_response(&buf).status, 200);
    let seen = script.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].body, b"hello");
    assert_eq!(
        seen[0].header_all("authorization"),
        vec![format!("Bearer {}", f.creds.api_token)]
    );
    assert!(
        !seen[0]
            .trailers
            .to_ascii_lowercase()
            .contains("authorization")
            && !seen[0].trailers.contains("dummy"),
        "agent trailers reached the upstream: {:?}",
        seen[0].trailers
    );
    assert!(seen[0].header("trailer").is_none());
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_streams_on_one_connection_are_each_decided_on_their_own() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let conn = tunnel_h2(&f, &task, "secure.test").await;
    let paths = [
        "/echo",
        "/repos/acme/web/pulls",
        "/repos/acme/web/issues",
        "/reflect-auth/x",
    ];
    let futs = paths.iter().map(|p| {
        let mut c = conn.clone();
        let uri = f.tls_url("secure.test", p);
        async move { h2_send(&mut c, h2_req("GET", &uri, b"")).await }
    });
    let resps = bounded("streams", futures_util::future::join_all(futs)).await;
    for r in &resps {
        kw.saw(&r.text());
    }
    assert_eq!(resps[0].status, 200);
    assert_eq!(resps[2].status, 200);
    kw.assert_denied_raw(&resps[1], 403, "route_not_in_intent")
        .await;
    kw.assert_denied_raw(&resps[3], 403, "route_not_in_intent")
        .await;
    let mut seen: Vec<String> = f.tls.seen().into_iter().map(|s| s.path).collect();
    seen.sort();
    assert_eq!(seen, vec!["/echo", "/repos/acme/web/issues"]);
    for s in f.tls.seen() {
        assert_eq!(s.header_all("x-api-key"), vec![f.creds.tls_token.clone()]);
    }
    kw.assert_no_leaks().await;
}

/// An intercepted HTTP/2 connection to `secure.test` on the `h2` crate itself, which sends
/// what hyper's client would tidy up (a repeated header, data past the content-length).
async fn raw_h2(f: &Fixture, task: &crate::common::Task) -> h2::client::SendRequest<Bytes> {
    raw_h2_at(f, task, f.tls.port()).await
}

/// `raw_h2` to `secure.test` on `port` (an upstream of the test's own).
async fn raw_h2_at(
    f: &Fixture,
    task: &crate::common::Task,
    port: u16,
) -> h2::client::SendRequest<Bytes> {
    let tls = crate::headers::tunnel_tls_at(f, task, "secure.test", port, &[b"h2"]).await;
    let (h2, conn) = bounded("h2 handshake", h2::client::handshake(tls))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    h2
}

// RFC 9110 §8.6: a repeated or zero-padded Content-Length reaches the upstream as one plain
// value; HTTP/2 passes a repeated one through, and an upstream could read it another way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_length_reaches_the_upstream_once_and_canonical() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["secure.read", "plain.issues.read"]))
        .await;
    let mut h2 = raw_h2(&f, &task).await;
    let post = |lengths: &[&str]| {
        let mut req = http::Request::builder()
            .method("POST")
            .uri(f.tls_url("secure.test", "/echo"));
        for l in lengths {
            req = req.header("content-length", *l);
        }
        req.body(()).unwrap()
    };
    for lengths in [&["3", "3"][..], &["03"], &["3", "003"]] {
        bounded(
            "h2 ready",
            futures_util::future::poll_fn(|cx| h2.poll_ready(cx)),
        )
        .await
        .unwrap();
        let (resp, mut stream) = h2.send_request(post(lengths), false).unwrap();
        stream.send_data(Bytes::from_static(b"abc"), true).unwrap();
        let resp = bounded("h2 response", resp).await.unwrap();
        assert_eq!(resp.status(), 200, "{lengths:?}");
        let seen = f.tls.last();
        assert_eq!(seen.header_all("content-length"), ["3"], "{lengths:?}");
        assert_eq!(seen.body, b"abc", "{lengths:?}");
    }
    // The same over HTTP/1.1 on the plain listener.
    let req = format!(
        "{}abc",
        raw_req(
            &f,
            "POST",
            "plain.test",
            "/echo",
            &task,
            "Content-Length: 003\r\n"
        )
    );
    let resp = parse_response(&exchange(&f, req.as_bytes()).await);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = f.plain.last();
    assert_eq!(seen.header_all("content-length"), ["3"]);
    assert_eq!(seen.body, b"abc");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_data_longer_than_content_length_never_reaches_the_upstream_whole() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut h2 = raw_h2(&f, &task).await;
    let req = http::Request::builder()
        .method("POST")
        .uri(f.tls_url("secure.test", "/echo"))
        .header("content-length", "3")
        .body(())
        .unwrap();
    let (resp, mut stream) = h2.send_request(req, false).unwrap();
    stream
        .send_data(Bytes::from_static(b"hello world"), true)
        .unwrap();
    match bounded("h2 response", resp).await {
        Ok(r) => assert_ne!(r.status(), 200, "an oversized body was accepted"),
        Err(e) => assert!(e.is_reset() || e.is_go_away() || e.is_io(), "{e:?}"),
    }
    for s in f.tls.seen() {
        assert_ne!(
            s.body, b"hello world",
            "the upstream got the mismatched body"
        );
        assert!(s.body.len() <= 3, "{:?}", s.body);
    }
    // Recorded once, as the agent's malformed body (400), also when the data came with the
    // head and the HTTP/2 layer reset the stream before its body was read. When the body was
    // already on its way to the upstream as the stream was reset, the request reads as one
    // whose agent left (499): which of the two is best effort (README), and about one run in
    // ten lands on the second, so either is accepted, with its own status.
    let rec = kw
        .audit_where("the overrunning upload", |r| r["method"] == "POST")
        .await;
    match rec["outcome"].as_str() {
        Some("agent_body_error") => assert_eq!(rec["status"], 400, "{rec}"),
        Some("client_closed") => assert_eq!(rec["status"], 499, "{rec}"),
        _ => panic!("the overrun recorded as neither: {rec}"),
    }
    // The connection (or a new one) still serves a well-formed request.
    let mut h1 = tunnel_h1(&f, &task, "secure.test").await;
    let host = format!("secure.test:{}", f.tls.port());
    let ok = crate::common::h1_send(&mut h1, get("/echo", &host)).await;
    kw.saw(&ok.text());
    assert_eq!(ok.status, 200);
    kw.assert_no_leaks().await;
}

/// Most HTTP/1 clients write a whole upload before they read. A refusal must reach them: a
/// connection closed with the upload unread is reset, and the reset can take the refusal with
/// it (the agent saw a broken pipe or a TLS EOF instead of why). keyward reads and drops what
/// is left of a refused body (bounded) before it answers; none of it goes upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_upload_written_whole_before_reading_gets_its_refusal() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let body = vec![b'B'; 4 << 20];
    for round in 0..3 {
        let head = raw_req(
            &f,
            "POST",
            "plain.test",
            "/not-in-the-intent",
            &task,
            &format!("Content-Length: {}\r\n", body.len()),
        );
        let mut tcp = TcpStream::connect(f.kw.proxy_addr).await.unwrap();
        let mut wire = head.into_bytes();
        wire.extend_from_slice(&body);
        // Everything first, as `urllib` and `requests` over TLS do; then the answer.
        let wrote = bounded("the upload", tcp.write_all(&wire)).await;
        let mut buf = Vec::new();
        let read = bounded("the answer", tcp.read_to_end(&mut buf)).await;
        assert!(
            wrote.is_ok(),
            "round {round}: the upload was cut ({wrote:?}); read before the cut: {read:?} {}",
            String::from_utf8_lossy(&buf)
        );
        assert!(read.is_ok(), "round {round}: {read:?}");
        let resp = parse_response(&buf);
        kw.saw(&resp.text());
        kw.assert_denied_raw(&resp, 403, "route_not_in_intent")
            .await;
    }
    // Not for a connection that shows no valid token: it gives its place up at once (a full
    // listener evicts such connections), so its refusal does not wait on its body.
    let mut tcp = TcpStream::connect(f.kw.proxy_addr).await.unwrap();
    let port = f.plain.port();
    let head = format!(
        "POST http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nContent-Length: 8000000\r\n\r\nx"
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let started = std::time::Instant::now();
    let resp = crate::common::read_response(&mut tcp).await;
    assert_eq!(resp.status, 407, "{}", resp.text());
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the 407 waited {:?} on a body",
        started.elapsed()
    );
    assert_eq!(f.plain.hits(), 0, "a refused body went upstream");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_continue_on_a_denied_request_sends_no_100_and_no_body_upstream() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("reader", json!(["plain.issues.read"])).await;
    let head = raw_req(
        &f,
        "POST",
        "plain.test",
        "/repos/acme/web/labels",
        &task,
        "Content-Length: 11\r\nExpect: 100-continue\r\n",
    );
    let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    // The denial comes without a `100 Continue` first: the agent is never invited to send.
    let resp = crate::common::read_response(&mut tcp).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 403, "{}", resp.text());
    kw.assert_denied_raw(&resp, 403, "route_not_in_intent")
        .await;
    assert_eq!(f.plain.hits(), 0);
    // Allowed: 100 Continue, then the body travels.
    let head = raw_req(
        &f,
        "POST",
        "plain.test",
        "/echo",
        &task,
        "Content-Length: 11\r\nExpect: 100-continue\r\n",
    );
    let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
    tcp.write_all(head.as_bytes()).await.unwrap();
    let cont = crate::common::read_response(&mut tcp).await;
    assert_eq!(cont.status, 100);
    tcp.write_all(b"hello world").await.unwrap();
    let resp = crate::common::read_response(&mut tcp).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200);
    assert_eq!(f.plain.last().body, b"hello world");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_body_of_a_denied_request_is_not_read_as_the_next_request() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("reader", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let inner =
        format!("GET http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\n\r\n");
    let denied = raw_req(
        &f,
        "POST",
        "plain.test",
        "/repos/acme/web/labels",
        &task,
        "Transfer-Encoding: chunked\r\n",
    )
    .replace("Connection: close\r\n", "");
    let body = format!("{:x}\r\n{inner}\r\n0\r\n\r\n", inner.len());
    let allowed = raw_req(&f, "GET", "plain.test", "/repos/acme/web/issues", &task, "");
    let buf = exchange(&f, format!("{denied}{body}{allowed}").as_bytes()).await;
    let resps = parse_many(&buf);
    assert!(!resps.is_empty());
    kw.assert_denied_raw(&resps[0], 403, "route_not_in_intent")
        .await;
    for r in &resps[1..] {
        assert_eq!(r.status, 200, "{}", r.text());
    }
    for s in f.plain.seen() {
        assert_eq!(
            s.path, "/repos/acme/web/issues",
            "the chunked body was read as a request"
        );
    }
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_response_with_conflicting_framing_is_not_relayed_as_is() {
    let script = ScriptUpstream::start(|req| {
        let line = req.request_line();
        let bytes: Vec<u8> = if line.contains("case=two-lengths") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 9\r\n\r\nfourfive!".to_vec()
        } else if line.contains("case=list-length") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 4, 9\r\n\r\nfourfive!".to_vec()
        } else if line.contains("case=cl-and-te") {
            b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nfour\r\n0\r\n\r\n".to_vec()
        } else if line.contains("case=header-crlf") {
            b"HTTP/1.1 200 OK\r\nX-Split: a\rSet-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok".to_vec()
        } else {
            http_response("200 OK", &[], b"fresh")
        };
        Reply::bytes(bytes).then(crate::common::After::Close)
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    for case in ["two-lengths", "list-length", "header-crlf"] {
        let resp = kw
            .raw(&raw_req_at(
                port,
                "GET",
                "plain.test",
                &format!("/echo?case={case}"),
                &task,
                "",
            ))
            .await;
        assert_eq!(resp.status, 502, "{case}: {}", resp.text());
        assert!(resp.header("set-cookie").is_none());
        let problem: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        // Reached, but its answer was not HTTP: not "unreachable".
        assert_eq!(
            problem["reason"], "upstream_bad_answer",
            "{case}: {problem}"
        );
        let rec = kw.audit_for(problem["request_id"].as_str().unwrap()).await;
        assert_eq!(rec["status"], 502, "{rec}");
    }
    // Transfer-Encoding wins over Content-Length (RFC 9112 §6.3): the chunked body, whole.
    let resp = kw
        .raw(&raw_req_at(
            port,
            "GET",
            "plain.test",
            "/echo?case=cl-and-te",
            &task,
            "",
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, b"four");
    assert_ne!(resp.header("content-length").as_deref(), Some("100"));
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_connections_are_never_shared_across_services_on_one_address() {
    let ca = crate::common::TestCa::new();
    let script = ScriptUpstream::tls(&ca, &["secure.test", "other.test"], |_| {
        Reply::bytes(http_response("200 OK", &[], b"ok"))
    })
    .await;
    let port = script.port();
    let f = fixture_with_tls_upstream_at(port, &ca).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read", "other.read"])).await;
    let mut secure = crate::common::h1_over(
        crate::headers::tunnel_tls_at(&f, &task, "secure.test", port, &[b"http/1.1"]).await,
    )
    .await;
    let mut other = crate::common::h1_over(
        crate::headers::tunnel_tls_at(&f, &task, "other.test", port, &[b"http/1.1"]).await,
    )
    .await;
    for _ in 0..3 {
        let r =
            crate::common::h1_send(&mut secure, get("/echo", &format!("secure.test:{port}"))).await;
        assert_eq!(r.status, 200, "{}", r.text());
        let r = crate::common::h1_send(&mut other, get("/x", &format!("other.test:{port}"))).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let mut per_conn: BTreeMap<usize, BTreeSet<String>> = BTreeMap::new();
    for s in script.seen() {
        let key = s.header("x-api-key").unwrap();
        let which = if key == f.creds.tls_token {
            "tls_token"
        } else if key == f.creds.other_token {
            "other_token"
        } else {
            panic!("unexpected credential on {}", s.request_line())
        };
        per_conn
            .entry(s.conn)
            .or_default()
            .insert(which.to_string());
    }
    assert_eq!(script.hits(), 6);
    for (conn, creds) in &per_conn {
        assert_eq!(creds.len(), 1, "TLS connection {conn} carried {creds:?}");
    }
    kw.assert_no_leaks().await;
}

/// A TLS acceptor for `names` (signed by `ca`) offering HTTP/2 only, and a listener for it.
async fn h2_only_tls(
    ca: &crate::common::TestCa,
    names: &[&str],
) -> (tokio_rustls::TlsAcceptor, tokio::net::TcpListener) {
    let (cert, key) = ca.leaf(names);
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::common::ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert], key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    (acceptor, listener)
}

/// A TLS upstream speaking HTTP/2 only, recording each request's trailers (as text).
async fn h2_trailer_recorder(
    ca: &crate::common::TestCa,
    names: &[&str],
) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (acceptor, listener) = h2_only_tls(ca, names).await;
    let port = listener.local_addr().unwrap().port();
    let seen: std::sync::Arc<std::sync::Mutex<Vec<String>>> = Default::default();
    let seen2 = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, seen) = (acceptor.clone(), seen2.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let seen = seen.clone();
                        async move {
                            let collected = http_body_util::BodyExt::collect(req.into_body()).await;
                            let trailers = collected
                                .ok()
                                .and_then(|c| c.trailers().cloned())
                                .map(|t| format!("{t:?}"))
                                .unwrap_or_default();
                            seen.lock().unwrap().push(trailers);
                            Ok::<_, std::convert::Infallible>(http::Response::new(
                                http_body_util::Full::new(Bytes::from_static(b"ok")),
                            ))
                        }
                    });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_request_trailers_never_reach_an_http2_upstream() {
    let ca = crate::common::TestCa::new();
    let (port, trailers) = h2_trailer_recorder(&ca, &["secure.test"]).await;
    let f = fixture_with_tls_upstream_at(port, &ca).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    // An HTTP/2 agent sends trailers naming the injected header.
    let mut h2 = raw_h2_at(&f, &task, port).await;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://secure.test:{port}/echo"))
        .body(())
        .unwrap();
    let (resp, mut stream) = h2.send_request(req, false).unwrap();
    stream
        .send_data(Bytes::from_static(b"body"), false)
        .unwrap();
    let mut t = http::HeaderMap::new();
    t.insert("x-api-key", "dummy-trailer".parse().unwrap());
    t.insert("authorization", "Bearer dummy-trailer".parse().unwrap());
    stream.send_trailers(t).unwrap();
    let resp = bounded("h2 response", resp).await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    while let Some(chunk) = bounded("body", body.data()).await {
        let _ = body
            .flow_control()
            .release_capacity(chunk.map(|c| c.len()).unwrap_or(0));
    }
    // An HTTP/1.1 agent's chunked trailers, written raw inside the tunnel.
    let mut tls =
        crate::headers::tunnel_tls_at(&f, &task, "secure.test", port, &[b"http/1.1"]).await;
    let raw = format!(
        "POST /echo HTTP/1.1\r\nHost: secure.test:{port}\r\nTransfer-Encoding: chunked\r\nTrailer: X-Api-Key\r\nTE: trailers\r\nConnection: close\r\n\r\n1\r\nx\r\n0\r\nX-Api-Key: dummy-trailer\r\n\r\n"
    );
    bounded("write", tls.write_all(raw.as_bytes()))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = bounded("read", tls.read_to_end(&mut buf)).await;
    let r = parse_response(&buf);
    kw.saw(&r.text());
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = trailers.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for t in &seen {
        assert!(
            !t.contains("dummy"),
            "agent trailers reached the upstream: {t}"
        );
    }
    kw.assert_no_leaks().await;
}

/// An HTTP/2 upstream that resets a stream with `NO_ERROR` before its `Content-Length` is
/// reached: hyper reads that as the end of the body. keyward, which drops `Content-Length` to
/// redact, cuts the agent's response instead of ending it as if whole, and records the
/// failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_body_cut_short_is_cut_for_the_agent_too() {
    let ca = crate::common::TestCa::new();
    let (acceptor, listener) = h2_only_tls(&ca, &["secure.test"]).await;
    let port = listener.local_addr().unwrap().port();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut conn = h2::server::handshake(tls).await.unwrap();
        // (`accept` drives the connection: each stream is answered beside it.)
        while let Some(Ok((_req, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let head = http::Response::builder()
                    .header("content-length", "100")
                    .body(())
                    .unwrap();
                let mut stream = respond.send_response(head, false).unwrap();
                stream
                    .send_data(Bytes::from_static(b"8 bytes!"), false)
                    .unwrap();
                // Once the head and the first bytes are through to the agent.
                tokio::time::sleep(Duration::from_millis(200)).await;
                stream.send_reset(h2::Reason::NO_ERROR);
            });
        }
    });
    let f = fixture_with_tls_upstream_at(port, &ca).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut agent = crate::common::h1_over(
        crate::headers::tunnel_tls_at(&f, &task, "secure.test", port, &[b"http/1.1"]).await,
    )
    .await;
    bounded("h1 ready", agent.ready()).await.unwrap();
    let resp = bounded(
        "the response head",
        agent.send_request(get("/echo", &format!("secure.test:{port}"))),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let body = bounded(
        "the cut body",
        http_body_util::BodyExt::collect(resp.into_body()),
    )
    .await;
    assert!(body.is_err(), "a body cut short reached the agent as whole");
    let rec = kw
        .audit_where("the cut response", |r| r["path"] == "/echo")
        .await;
    assert_eq!(rec["outcome"], "upstream_error", "{rec}");
    server.abort();
    kw.assert_no_leaks().await;
}

/// gRPC through keyward: `te: trailers` reaches an HTTP/2 upstream (gRPC servers refuse a call
/// without it; `Connection: te`, meant for HTTP/1, made hyper drop it), and a trailers-only
/// answer (HEADERS with END_STREAM, the status in the head) reaches the agent as one, not as a
/// head and an empty DATA frame (a gRPC client reads that as "no trailers": INTERNAL).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_calls_keep_te_trailers_and_trailers_only_answers() {
    let ca = crate::common::TestCa::new();
    let (acceptor, listener) = h2_only_tls(&ca, &["secure.test"]).await;
    let port = listener.local_addr().unwrap().port();
    let te_seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<Option<String>>::new()));
    let seen = te_seen.clone();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut conn = h2::server::handshake(tls).await.unwrap();
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            let te = req
                .headers()
                .get("te")
                .map(|v| v.to_str().unwrap().to_string());
            seen.lock().unwrap().push(te);
            let head = http::Response::builder()
                .header("content-type", "application/grpc")
                .header("grpc-status", "12")
                .header("grpc-message", "unimplemented method")
                .body(())
                .unwrap();
            let _ = respond.send_response(head, true);
        }
    });
    let f = fixture_with_tls_upstream_at(port, &ca).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut h2 = raw_h2_at(&f, &task, port).await;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://secure.test:{port}/echo"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    // Twice: the first call dials the upstream, the second rides its pooled connection.
    for _ in 0..2 {
        bounded(
            "h2 ready",
            futures_util::future::poll_fn(|cx| h2.poll_ready(cx)),
        )
        .await
        .unwrap();
        let (resp, mut stream) = h2.send_request(req.clone(), false).unwrap();
        stream
            .send_data(Bytes::from_static(b"\0\0\0\0\0"), true)
            .unwrap();
        let resp = bounded("the answer", resp).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["grpc-status"], "12");
        assert!(
            resp.body().is_end_stream(),
            "the head did not end the stream: the agent's gRPC client sees no trailers"
        );
    }
    assert_eq!(
        *te_seen.lock().unwrap(),
        [Some("trailers".to_string()), Some("trailers".to_string())]
    );
    for rec in kw.audit_count(2, |r| r["path"] == "/echo").await {
        assert_eq!(rec["outcome"], "completed", "{rec}");
        assert_eq!(rec["status"], 200, "{rec}");
    }
    server.abort();
    kw.assert_no_leaks().await;
}

/// (connection, head, body) of every request the CL.0 upstream read.
type Cl0Log = std::sync::Arc<std::sync::Mutex<Vec<(usize, String, Vec<u8>)>>>;

/// An upstream with the CL.0 desync: on `/echo` it answers at once and never reads the body
/// (as a route that takes none might), everywhere else it reads `Content-Length` bytes. It
/// keeps every connection open whatever `Connection` says. Records (connection, head, body).
async fn cl0_upstream() -> (u16, Cl0Log, tokio::task::JoinHandle<()>) {
    use std::sync::Arc;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Cl0Log = Arc::default();
    let log = seen.clone();
    let accept = tokio::spawn(async move {
        for conn in 0.. {
            let Ok((mut tcp, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let end = loop {
                        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            break i + 4;
                        }
                        match tcp.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    buf.drain(..end);
                    let len = if head.starts_with("POST /echo ") {
                        0
                    } else {
                        head.lines()
                            .filter_map(|l| l.split_once(':'))
                            .find(|(n, _)| n.eq_ignore_ascii_case("content-length"))
                            .and_then(|(_, v)| v.trim().parse().ok())
                            .unwrap_or(0)
                    };
                    while buf.len() < len {
                        match tcp.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    }
                    let body: Vec<u8> = buf.drain(..len).collect();
                    log.lock().unwrap().push((conn, head, body));
                    let reply = http_response("200 OK", &[], b"ok");
                    if tcp.write_all(&reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (port, seen, accept)
}

/// The 0.CL / CL.0 desync through keyward: an upstream that does not read a body as the body
/// reads the agent's body as the connection's next request, which keyward never decided. If
/// keyward sent the task's next request on that connection, the smuggled request's
/// `Content-Length` would swallow its head, injected credential included, as the smuggled
/// request's body. A connection that carried a body is closed after it and says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_the_upstream_did_not_read_never_swallows_the_next_request() {
    let (port, seen, accept) = cl0_upstream().await;
    let f = Fixture::start_with(|p| plain_services_at(p, port)).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let smuggled = "POST /capture HTTP/1.1\r\nHost: plain.test\r\nContent-Length: 400\r\n\r\n";
    // Both on one agent connection, so the second would take the first's upstream connection.
    let first = format!(
        "POST http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nContent-Length: {}\r\n\r\n{smuggled}",
        Harness::proxy_auth(&task),
        smuggled.len()
    );
    let second = raw_req_at(port, "GET", "plain.test", "/echo?second", &task, "");
    let mut tcp = bounded("connect", TcpStream::connect(kw.proxy_addr))
        .await
        .unwrap();
    bounded("write", tcp.write_all(first.as_bytes()))
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while parse_many(&got).is_empty() {
        let n = bounded("first answer", tcp.read(&mut chunk)).await.unwrap();
        assert!(n > 0, "closed before the first answer");
        got.extend_from_slice(&chunk[..n]);
    }
    bounded("write", tcp.write_all(second.as_bytes()))
        .await
        .unwrap();
    let _ = bounded("read to EOF", tcp.read_to_end(&mut got)).await;
    let answers = parse_many(&got);
    assert_eq!(answers.len(), 2, "{}", String::from_utf8_lossy(&got));
    assert!(answers.iter().all(|a| a.status == 200));

    let seen = seen.lock().unwrap().clone();
    accept.abort();
    let heads: Vec<&str> = seen.iter().map(|(_, h, _)| h.as_str()).collect();
    let (post_conn, post_head, _) = seen
        .iter()
        .find(|(_, h, _)| h.starts_with("POST /echo "))
        .unwrap();
    assert!(
        post_head
            .to_ascii_lowercase()
            .contains("\r\nconnection: close\r\n"),
        "the request with a body must ask for the connection to close: {post_head}"
    );
    // The broken upstream did read the body as a request (keyward cannot stop that), but the
    // next request went on another connection, whole, and nothing swallowed the credential.
    let (second_conn, _, _) = seen
        .iter()
        .find(|(_, h, _)| h.starts_with("GET /echo?second "))
        .unwrap_or_else(|| panic!("the second request never arrived as a request: {heads:?}"));
    assert_ne!(second_conn, post_conn, "{heads:?}");
    for (_, head, body) in &seen {
        assert!(
            !String::from_utf8_lossy(body).contains(&f.creds.api_token),
            "a credential was captured as the body of {head}"
        );
    }
    kw.assert_no_leaks().await;
}

/// `Expect: 100-continue` is answered by keyward and not passed on: an upstream that answers
/// `417` without reading the body would read it as the next request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_is_answered_by_keyward_and_not_passed_on() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let mut tcp = bounded("connect", TcpStream::connect(kw.proxy_addr))
        .await
        .unwrap();
    let head = format!(
        "POST http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
        Harness::proxy_auth(&task)
    );
    bounded("write", tcp.write_all(head.as_bytes()))
        .await
        .unwrap();
    let mut got = [0u8; 64];
    let n = bounded("100 Continue", tcp.read(&mut got)).await.unwrap();
    assert!(
        got[..n].starts_with(b"HTTP/1.1 100 Continue"),
        "{}",
        String::from_utf8_lossy(&got[..n])
    );
    bounded("write", tcp.write_all(b"hello")).await.unwrap();
    let mut rest = Vec::new();
    let _ = bounded("read to EOF", tcp.read_to_end(&mut rest)).await;
    let resp = parse_response(&rest);
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = f.plain.last();
    assert_eq!(seen.body, b"hello");
    assert!(seen.header("expect").is_none(), "{:?}", seen.headers);
}

/// An HTTP/2 agent may send each cookie as its own field; an HTTP/1 upstream gets them joined
/// into one `Cookie` line (RFC 9113 §8.2.3), as origins read only one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_cookie_crumbs_reach_an_http1_upstream_as_one_line() {
    let ca = crate::common::TestCa::new();
    let script = ScriptUpstream::tls(&ca, &["secure.test"], |_| {
        Reply::bytes(http_response("200 OK", &[], b"ok"))
    })
    .await;
    let port = script.port();
    let f = fixture_with_tls_upstream_at(port, &ca).await;
    let task = f.kw.mint("bot", json!(["secure.read"])).await;
    let mut h2 = crate::common::h2_over(
        crate::headers::tunnel_tls_at(&f, &task, "secure.test", port, &[b"h2"]).await,
    )
    .await;
    let mut req = h2_req("GET", &format!("https://secure.test:{port}/echo"), b"");
    for crumb in ["a=1", "b=2", "c=3"] {
        req.headers_mut()
            .append("cookie", http::HeaderValue::from_static(crumb));
    }
    let resp = h2_send(&mut h2, req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = script.seen();
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].header_all("cookie"), ["a=1; b=2; c=3"]);
}

/// A transfer coding besides `chunked` (`gzip, chunked`) would reach the upstream as a plain
/// body of gzip bytes once the chunks are taken off: refused, and nothing is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_codings_other_than_chunked_are_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    for coding in ["gzip, chunked", "deflate,chunked", "identity, chunked"] {
        let req = format!(
            "POST http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nTransfer-Encoding: {coding}\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            Harness::proxy_auth(&task)
        );
        let resp = kw.raw(&req).await;
        assert_eq!(resp.status, 400, "{coding}: {}", resp.text());
        assert_eq!(
            resp.header("x-keyward-reason").as_deref(),
            Some("ambiguous_request")
        );
        assert!(resp.text().contains("transfer_coding"), "{}", resp.text());
    }
    assert_eq!(f.plain.hits(), 0);
    // `chunked` alone, in any case, still streams.
    let req = format!(
        "POST http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nTransfer-Encoding: Chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        Harness::proxy_auth(&task)
    );
    let resp = kw.raw(&req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(f.plain.last().body, b"hello");
}

/// An HTTP/2 upstream that refuses every stream on a connection (`REFUSED_STREAM`; Node
/// answers `ENHANCE_YOUR_CALM` once agents left many downloads unread) would fail every
/// task's requests for as long as it keeps that shared connection open: keyward retires it
/// and the next request dials a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_upstream_connection_that_refuses_streams_is_retired() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let ca = crate::common::TestCa::new();
    let (acceptor, listener) = h2_only_tls(&ca, &["secure.test"]).await;
    let port = listener.local_addr().unwrap().port();
    let conns = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let n = counted.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut h2) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((_req, mut respond))) = h2.accept().await {
                    if n == 0 {
                        // The first connection stays open and refuses everything.
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                    } else {
                        let resp = http::Response::builder().status(200).body(()).unwrap();
                        if let Ok(mut body) = respond.send_response(resp, false) {
                            let _ = body.send_data(Bytes::from_static(b"fresh"), true);
                        }
                    }
                }
            });
        }
    });
    let f = fixture_with_tls_upstream_at(port, &ca).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let url = format!("https://secure.test:{port}/echo");
    let first = kw.send(kw.agent(&task).get(&url)).await;
    assert_eq!(first.status, 502, "{}", first.body);
    let second = kw.send(kw.agent(&task).get(&url)).await;
    assert_eq!(second.status, 200, "{}", second.body);
    assert_eq!(second.body, "fresh");
    assert_eq!(conns.load(Ordering::SeqCst), 2);
    server.abort();
    kw.assert_no_leaks().await;
}

/// The standard fixture with its TLS services at `port` (an upstream with a certificate from
/// `ca`), `ca` trusted for them.
async fn fixture_with_tls_upstream_at(port: u16, ca: &crate::common::TestCa) -> Fixture {
    let f = Fixture::start_with(|p| crate::common::tls_services_at(p, port)).await;
    // The services' `ca_file` is read again at the reload.
    std::fs::write(f.kw.path("upstream-ca.pem"), &ca.pem).unwrap();
    let (status, _) = f.kw.admin(http::Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200);
    f
}
