//! Headers and injection: whatever the agent puts where the credential goes is replaced, never
//! merged (case variants, duplicates, `_` look-alikes, query parameters in every spelling);
//! `Connection` cannot strip the credential; hop-by-hop and proxy headers never travel; head
//! size and header count are capped (431). Also the helpers the other families of this file set
//! share (raw requests, intercepted tunnels).

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;

use crate::common::{h1_send, h2_send, raw_exchange, Fixture, Harness, RawResp, Task};

/// A raw absolute-form request to `host` on the plain upstream's port, with `extra` header
/// lines (each ending in CRLF) and `Connection: close`.
pub(crate) fn raw_req(
    f: &Fixture,
    method: &str,
    host: &str,
    path: &str,
    task: &Task,
    extra: &str,
) -> String {
    let port = f.plain.port();
    raw_req_at(port, method, host, path, task, extra)
}

/// The same for any port.
pub(crate) fn raw_req_at(
    port: u16,
    method: &str,
    host: &str,
    path: &str,
    task: &Task,
    extra: &str,
) -> String {
    format!(
        "{method} http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: {}\r\n{extra}Connection: close\r\n\r\n",
        Harness::proxy_auth(task)
    )
}

/// A bodiless request for an h1/h2 client connection inside a tunnel.
pub(crate) fn get(path: &str, host: &str) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// An HTTP/2 request (`:authority` from `uri`).
pub(crate) fn h2_req(method: &str, uri: &str, body: &'static [u8]) -> http::Request<Full<Bytes>> {
    http::Request::builder()
        .method(method)
        .version(http::Version::HTTP_2)
        .uri(uri)
        .body(Full::new(Bytes::from_static(body)))
        .unwrap()
}

pub(crate) use crate::common::{tunnel_h1, tunnel_h2, tunnel_tls, tunnel_tls_at};

/// The one allowed record of `task` for `path` (exactly one, I6).
pub(crate) async fn allowed_record(kw: &Harness, task: &Task, path: &str) -> serde_json::Value {
    let rec = kw
        .audit_where(&format!("allowed {path}"), |r| {
            r["task"] == task.id.as_str() && r["path"] == path && r["reason"] == "allowed"
        })
        .await;
    crate::common::assert_record(&rec);
    let id = rec["request_id"].as_str().unwrap().to_string();
    kw.audit_for(&id).await
}

/// Every header name the upstream of the standard fixture saw last, lowercased.
fn seen_names(f: &Fixture) -> Vec<String> {
    f.plain
        .last()
        .headers
        .iter()
        .map(|(n, _)| n.to_ascii_lowercase())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_authorization_in_every_case_spelling_is_replaced_not_merged() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let resp = kw
        .raw(&raw_req(
            &f,
            "GET",
            "plain.test",
            "/echo",
            &task,
            "authorization: Bearer dummy-lower\r\nAUTHORIZATION: Bearer dummy-upper\r\nAuThOrIzAtIoN: Basic ZHVtbXk6ZHVtbXk=\r\n",
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = f.plain.last();
    assert_eq!(
        seen.header_all("authorization"),
        vec![format!("Bearer {}", f.creds.api_token)]
    );
    assert!(!format!("{:?}", seen.headers).contains("dummy"));
    allowed_record(kw, &task, "/echo").await;
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_injected_header_inside_a_tunnel_is_replaced_over_h1_and_h2() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let host = format!("secure.test:{}", f.tls.port());

    let mut h1 = tunnel_h1(&f, &task, "secure.test").await;
    let mut req = get("/echo", &host);
    for v in ["dummy-one", "dummy-two"] {
        req.headers_mut()
            .append("X-API-KEY", http::HeaderValue::from_static(v));
    }
    let resp = h1_send(&mut h1, req).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        f.tls.last().header_all("x-api-key"),
        vec![f.creds.tls_token.clone()]
    );

    let mut h2 = tunnel_h2(&f, &task, "secure.test").await;
    let mut req = h2_req("GET", &f.tls_url("secure.test", "/echo"), b"");
    for v in ["dummy-three", "dummy-four"] {
        req.headers_mut()
            .append("x-api-key", http::HeaderValue::from_static(v));
    }
    let resp = h2_send(&mut h2, req).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200, "{}", resp.text());
    let last = f.tls.last();
    assert_eq!(last.version, "HTTP/2.0");
    assert_eq!(
        last.header_all("x-api-key"),
        vec![f.creds.tls_token.clone()]
    );
    assert!(!format!("{:?}", last.headers).contains("dummy"));
    assert_eq!(f.tls.hits(), 2);
    kw.audit_count(2, |r| {
        r["task"] == task.id.as_str() && r["path"] == "/echo" && r["reason"] == "allowed"
    })
    .await;
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn separator_lookalikes_of_the_injected_header_are_ambiguous_in_every_mix() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let host = format!("secure.test:{}", f.tls.port());
    let mut conn = tunnel_h1(&f, &task, "secure.test").await;
    // `_` as CGI stacks read it, and `.`/`~` as lighttpd's CGI and FastCGI do (every
    // character but letters and digits becomes `_`).
    for name in [
        "X_API_KEY",
        "x-api_key",
        "x_api-key",
        "x.api.key",
        "X~Api.Key",
    ] {
        let mut req = get("/echo", &host);
        req.headers_mut().insert(
            http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
            http::HeaderValue::from_static("dummy"),
        );
        let resp = h1_send(&mut conn, req).await;
        kw.saw(&resp.text());
        let (problem, rec) = kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("header_lookalike"),
            "{name}: {problem}"
        );
        assert_eq!(rec["detail"], "header_lookalike", "{name}: {rec}");
    }
    // Over HTTP/2 too.
    let mut h2 = tunnel_h2(&f, &task, "secure.test").await;
    let mut req = h2_req("GET", &f.tls_url("secure.test", "/echo"), b"");
    req.headers_mut()
        .insert("x_api_key", http::HeaderValue::from_static("dummy"));
    let resp = h2_send(&mut h2, req).await;
    kw.saw(&resp.text());
    kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
    assert_eq!(f.tls.hits(), 0, "a look-alike reached the upstream");
    // A header that merely starts like it is not a look-alike.
    let mut req = get("/echo", &host);
    req.headers_mut()
        .insert("x-api-keys", http::HeaderValue::from_static("fine"));
    let resp = h1_send(&mut conn, req).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(f.tls.hits(), 1);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_credential_supplied_by_the_agent_in_every_spelling_is_replaced() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["query.search"])).await;
    let resp = kw
        .raw(&raw_req(
            &f,
            "GET",
            "query.test",
            "/search?api_key=dummy1&q=x&api%5Fkey=dummy2&api%5fkey=dummy3&api_key&api_key=&%61pi_key=dummy4",
            &task,
            "",
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = f.plain.last();
    let (path, query) = seen.path.split_once('?').unwrap();
    assert_eq!(path, "/search");
    assert!(!query.contains("dummy"), "{query}");
    let keys: Vec<&str> = query
        .split('&')
        .filter(|p| {
            let k = p.split('=').next().unwrap();
            k.eq_ignore_ascii_case("api_key")
                || k.eq_ignore_ascii_case("api%5fkey")
                || k == "%61pi_key"
        })
        .collect();
    assert_eq!(
        keys,
        vec![format!("api_key={}", f.creds.query_key)],
        "{query}"
    );
    assert!(query.split('&').any(|p| p == "q=x"), "{query}");
    let rec = allowed_record(kw, &task, "/search").await;
    assert_eq!(rec["credential"], "query_key");
    assert!(!rec.to_string().contains("dummy"), "{rec}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_header_cannot_strip_a_basic_or_tunnelled_credential() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["basic.whoami", "secure.read"])).await;
    // Basic injection on the plain listener.
    let resp = kw
        .raw(&raw_req(
            &f,
            "GET",
            "basic.test",
            "/whoami",
            &task,
            "Connection: Authorization\r\nAuthorization: Basic ZHVtbXk6ZHVtbXk=\r\n",
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        f.plain.last().header_all("authorization"),
        vec![crate::common::basic("bot", &f.creds.basic_pw)]
    );
    // A header credential inside a tunnel, named in Connection (h1: the only place it exists).
    let host = format!("secure.test:{}", f.tls.port());
    let mut conn = tunnel_h1(&f, &task, "secure.test").await;
    let mut req = get("/echo", &host);
    req.headers_mut().insert(
        "connection",
        http::HeaderValue::from_static("x-api-key, te"),
    );
    req.headers_mut()
        .insert("x-api-key", http::HeaderValue::from_static("dummy"));
    let resp = h1_send(&mut conn, req).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = f.tls.last();
    assert_eq!(
        seen.header_all("x-api-key"),
        vec![f.creds.tls_token.clone()]
    );
    assert!(!seen
        .header("connection")
        .unwrap_or_default()
        .contains("api"));
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_and_proxy_headers_are_not_forwarded() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let extra = "Proxy-Connection: keep-alive\r\n\
                 Keep-Alive: timeout=5, max=1000\r\n\
                 TE: trailers, deflate\r\n\
                 Trailer: X-Late\r\n\
                 Upgrade: h2c, TLS/1.2\r\n\
                 Proxy-Authenticate: Basic realm=x\r\n\
                 X-Named-Hop: goes-away\r\n\
                 Connection: X-Named-Hop\r\n\
                 X-Kept: stays\r\n";
    let resp = kw
        .raw(&raw_req(&f, "GET", "plain.test", "/echo", &task, extra))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let names = seen_names(&f);
    for hop in [
        "proxy-connection",
        "keep-alive",
        "trailer",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
        "x-named-hop",
    ] {
        assert!(
            !names.contains(&hop.to_string()),
            "{hop} forwarded: {names:?}"
        );
    }
    assert_eq!(f.plain.last().header("x-kept").as_deref(), Some("stays"));
    // Of the agent's `TE`, only what keyward itself accepts (`trailers`) is said again.
    assert_eq!(f.plain.last().header_all("te"), ["trailers"]);
    // The agent's token never travels, in any header.
    assert!(!format!("{:?}", f.plain.last().headers).contains(&task.token));
    allowed_record(kw, &task, "/echo").await;
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_authorization_is_not_forwarded_from_inside_a_tunnel() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let host = format!("secure.test:{}", f.tls.port());
    let mut conn = tunnel_h1(&f, &task, "secure.test").await;
    let mut req = get("/echo", &host);
    let auth = Harness::proxy_auth(&task);
    req.headers_mut()
        .insert("proxy-authorization", auth.parse().unwrap());
    req.headers_mut()
        .insert("proxy-connection", http::HeaderValue::from_static("close"));
    let resp = h1_send(&mut conn, req).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = f.tls.last();
    assert!(seen.header("proxy-authorization").is_none());
    assert!(seen.header("proxy-connection").is_none());
    assert!(!format!("{:?}", seen.headers).contains(&task.token));
    kw.assert_no_leaks().await;
}

/// `GET /echo` with `extra` header lines, written raw over an intercepted tunnel's TLS; the
/// connection closes after the answer.
async fn get_echo_in_tunnel(f: &Fixture, task: &crate::common::Task, extra: &str) -> RawResp {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tls = tunnel_tls(f, task, "secure.test", &[b"http/1.1"]).await;
    let req = format!(
        "GET /echo HTTP/1.1\r\nHost: secure.test:{}\r\n{extra}Connection: close\r\n\r\n",
        f.tls.port()
    );
    crate::common::bounded("write", tls.write_all(req.as_bytes()))
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = crate::common::bounded("read", tls.read_to_end(&mut buf)).await;
    let resp = crate::common::parse_response(&buf);
    f.kw.saw(&resp.text());
    resp
}

async fn raw_resp(f: &Fixture, request: &[u8]) -> RawResp {
    let resp = raw_exchange(f.kw.proxy_addr, request).await;
    f.kw.saw(&resp.text());
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_head_is_431_and_never_forwarded() {
    let f = Fixture::start_with(|p| {
        p.replacen(
            "proxy:\n  listen: 127.0.0.1:0\n",
            "proxy:\n  listen: 127.0.0.1:0\n  max_header_bytes: 16384\n",
            1,
        )
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    // Under the limit: served.
    let small = format!("X-Pad: {}\r\n", "a".repeat(8_000));
    let resp = raw_resp(
        &f,
        raw_req(&f, "GET", "plain.test", "/echo", &task, &small).as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(f.plain.hits(), 1);
    // Just under the limit (the head's other lines are a few hundred bytes): served.
    let near = format!("X-Pad: {}\r\n", "a".repeat(15_800));
    let resp = raw_resp(
        &f,
        raw_req(&f, "GET", "plain.test", "/echo", &task, &near).as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(f.plain.hits(), 2);
    // One huge header, then many medium ones: both over the limit.
    for extra in [
        format!("X-Pad: {}\r\n", "a".repeat(16_400)),
        format!("X-Pad: {}\r\n", "a".repeat(20_000)),
        (0..40)
            .map(|i| format!("X-Pad-{i}: {}\r\n", "b".repeat(500)))
            .collect::<String>(),
    ] {
        let resp = raw_resp(
            &f,
            raw_req(&f, "GET", "plain.test", "/echo", &task, &extra).as_bytes(),
        )
        .await;
        assert_eq!(resp.status, 431, "{}", resp.text());
    }
    assert_eq!(f.plain.hits(), 2, "an oversized head reached the upstream");
    kw.assert_no_leaks().await;
}

/// The parser's own limit is a buffer size that grows past `max_header_bytes` (at the default
/// 64 KiB it let ~110 KB heads through), so keyward counts the head itself: over the limit is
/// 431 with a problem document and a record, on the listener and in a tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_over_the_default_limit_is_431_with_a_problem_document() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["plain.issues.read", "secure.read"]))
        .await;
    let under = format!("X-Pad: {}\r\n", "a".repeat(64_000));
    let resp = raw_resp(
        &f,
        raw_req(&f, "GET", "plain.test", "/echo", &task, &under).as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let over = format!("X-Pad: {}\r\n", "a".repeat(70_000));
    let resp = raw_resp(
        &f,
        raw_req(&f, "GET", "plain.test", "/echo", &task, &over).as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 431, "{}", resp.text());
    let problem: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    // SPEC §4.3's word, the same in the header, the problem and the record.
    assert_eq!(problem["reason"], "ambiguous_request", "{problem}");
    assert_eq!(problem["status"], 431, "{problem}");
    assert_eq!(
        resp.header("x-keyward-reason").as_deref(),
        Some("ambiguous_request")
    );
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("max_header_bytes"),
        "{problem}"
    );
    let rec = kw
        .audit_where("the oversized head", |r| r["outcome"] == "head_too_large")
        .await;
    assert_eq!(rec["status"], 431, "{rec}");
    assert_eq!(rec["reason"], "ambiguous_request", "{rec}");
    assert_eq!(f.plain.hits(), 1, "an oversized head reached the upstream");

    let resp = get_echo_in_tunnel(&f, &task, &over).await;
    assert_eq!(resp.status, 431, "{}", resp.text());
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_many_headers_is_431_on_the_listener_and_inside_a_tunnel() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["plain.issues.read", "secure.read"]))
        .await;
    let many: String = (0..150).map(|i| format!("X-H{i}: v\r\n")).collect();
    let resp = raw_resp(
        &f,
        raw_req(&f, "GET", "plain.test", "/echo", &task, &many).as_bytes(),
    )
    .await;
    assert_eq!(resp.status, 431, "{}", resp.text());
    assert_eq!(f.plain.hits(), 0);

    // Inside an intercepted tunnel, written raw over TLS.
    let resp = get_echo_in_tunnel(&f, &task, &many).await;
    assert_eq!(resp.status, 431, "{}", resp.text());
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_http2_header_list_is_refused_before_the_upstream() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let tls = tunnel_tls(&f, &task, "secure.test", &[b"h2"]).await;
    let (mut h2, conn) = crate::common::bounded("h2 handshake", h2::client::handshake(tls))
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    // Somewhat over `max_header_bytes` (64 KiB): keyward's own 431, problem and record, as
    // over HTTP/1 (the HTTP/2 layer's limit is set 16 KiB higher so that it reaches keyward).
    let (resp, _) = h2.send_request(padded_get(&f, 35), true).unwrap();
    let resp = crate::common::bounded("h2 response", resp).await.unwrap();
    assert_eq!(resp.status(), 431);
    assert_eq!(resp.headers()["x-keyward-reason"], "ambiguous_request");
    let rec = kw
        .audit_where("the oversized head", |r| r["outcome"] == "head_too_large")
        .await;
    assert_eq!(rec["status"], 431, "{rec}");
    // Inside a tunnel its task and host are known (and its refusals paced as the task's).
    assert_eq!(rec["task"], task.id.as_str(), "{rec}");
    assert_eq!(rec["host"], "secure.test", "{rec}");
    // Far over it: the HTTP/2 layer's own answer, or a reset.
    let (resp, _) = h2.send_request(padded_get(&f, 60), true).unwrap();
    match crate::common::bounded("h2 response", resp).await {
        Ok(r) => assert_eq!(r.status(), 431),
        Err(e) => assert!(e.is_reset() || e.is_go_away() || e.is_io(), "{e:?}"),
    }
    assert_eq!(f.tls.hits(), 0);
    // A task that has ended is told so first, whatever its head (SPEC §4.2's 407).
    kw.revoke(&task.id).await;
    let (resp, _) = h2.send_request(padded_get(&f, 35), true).unwrap();
    let resp = crate::common::bounded("h2 response", resp).await.unwrap();
    assert_eq!(resp.status(), 407);
    assert_eq!(resp.headers()["x-keyward-reason"], "task_revoked");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_values_with_control_bytes_are_refused_before_the_upstream() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    for extra in [
        "X-Nul: a\0b\r\n",
        "X-Cr: a\rAuthorization: Bearer smuggled\r\n",
        "X-Lf-Only: a\nAuthorization: Bearer smuggled\r\n",
        "Bad Name: x\r\n",
        ": empty-name\r\n",
    ] {
        let resp = raw_resp(
            &f,
            raw_req(&f, "GET", "plain.test", "/echo", &task, extra).as_bytes(),
        )
        .await;
        if resp.status == 200 {
            // Accepted only if the line could not be read as two headers.
            let seen = f.plain.last();
            assert_eq!(
                seen.header_all("authorization"),
                vec![format!("Bearer {}", f.creds.api_token)],
                "{extra:?}"
            );
        } else {
            assert_eq!(resp.status, 400, "{extra:?}: {}", resp.text());
        }
    }
    for s in f.plain.seen() {
        assert!(!format!("{:?}", s.headers).contains("smuggled"));
    }
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_host_header_is_written_from_the_decided_target_not_the_agents() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let req = raw_req(
        &f,
        "GET",
        "PLAIN.Test.",
        "/echo",
        &task,
        // (`X-Forwarded-Host` is refused outright: see the host-override test.)
        "X-Forwarded-For: 192.0.2.1\r\n",
    );
    let resp = kw.raw(&req).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = f.plain.last();
    assert_eq!(seen.header_all("host"), vec![format!("plain.test:{port}")]);
    let rec = allowed_record(kw, &task, "/echo").await;
    assert_eq!(rec["host"], "plain.test");
    kw.assert_no_leaks().await;
}

/// `TE` is hop-by-hop and goes with the rest; what keyward itself accepts, `trailers`, is
/// said again when the agent asked for it (gRPC servers refuse a request without it), and
/// nothing else of the agent's `TE` travels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn te_trailers_is_said_to_the_upstream_when_the_agent_asks_for_trailers() {
    use crate::common::{plain_fixture_at, Reply, ScriptUpstream};
    let script =
        ScriptUpstream::start(|_| Reply::bytes(crate::common::http_response("200 OK", &[], b"ok")))
            .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    for (extra, want) in [
        ("TE: trailers\r\n", vec!["trailers"]),
        (
            "TE: gzip;q=0.5, Trailers\r\nConnection: TE\r\n",
            vec!["trailers"],
        ),
        ("TE: gzip\r\n", vec![]),
        ("", vec![]),
    ] {
        let resp = kw
            .raw(&raw_req_at(
                port,
                "GET",
                "plain.test",
                "/echo",
                &task,
                extra,
            ))
            .await;
        assert_eq!(resp.status, 200, "{extra:?}");
        let seen = script.seen().pop().unwrap();
        assert_eq!(seen.header_all("te"), want, "{extra:?}: {}", seen.head);
        // A sender of `TE` names it in `Connection` (RFC 9110 §10.1.4); without one, neither.
        let connection: Vec<String> = seen
            .header_all("connection")
            .into_iter()
            .filter(|v| v.eq_ignore_ascii_case("te"))
            .collect();
        assert_eq!(connection.len(), want.len(), "{extra:?}: {}", seen.head);
    }
    // With a body too, where the connection is also closed after the answer.
    for (extra, want) in [("TE: trailers\r\n", "close, te"), ("", "close")] {
        let req = raw_req_at(port, "POST", "plain.test", "/echo", &task, extra)
            .replace("\r\n\r\n", "\r\nContent-Length: 3\r\n\r\nabc");
        let resp = kw.raw(&req).await;
        assert_eq!(resp.status, 200, "{extra:?}");
        let seen = script.seen().pop().unwrap();
        assert_eq!(
            seen.header_all("connection"),
            [want],
            "{extra:?}: {}",
            seen.head
        );
    }
    kw.assert_no_leaks().await;
}

/// A status without a registered reason phrase keeps a phrase: a credentialed answer's own is
/// dropped (a reflected credential could hide there), and hyper would write `<none>`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unregistered_status_gets_its_class_as_reason_phrase() {
    use crate::common::{plain_fixture_at, Reply, ScriptUpstream};
    let script = ScriptUpstream::start(|_| {
        Reply::bytes(crate::common::http_response("599 My Own Reason", &[], b""))
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    let answer = raw_exchange_text(
        kw.proxy_addr,
        &raw_req_at(port, "GET", "plain.test", "/echo", &task, ""),
    )
    .await;
    let status_line = answer.lines().next().unwrap_or_default();
    assert_eq!(status_line, "HTTP/1.1 599 Server Error", "{answer}");
    kw.assert_no_leaks().await;
}

/// Sends `request` and returns the whole answer as text (the connection closes after it).
async fn raw_exchange_text(addr: std::net::SocketAddr, request: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let _ = crate::common::bounded("the answer", tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// `GET /echo` on secure.test with `n` headers of 2,000 bytes each.
fn padded_get(f: &Fixture, n: usize) -> http::Request<()> {
    let mut req = http::Request::builder()
        .method("GET")
        .uri(f.tls_url("secure.test", "/echo"));
    for i in 0..n {
        req = req.header(format!("x-pad-{i}"), "p".repeat(2_000));
    }
    req.body(()).unwrap()
}

/// keyward's own answer to a `HEAD` carries no body over HTTP/2 either (it sent its problem
/// document as DATA: a protocol error, and the agent never saw the refusal or its reason).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_head_over_http2_is_answered_without_a_body() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut h2 = tunnel_h2(&f, &task, "secure.test").await;
    for _ in 0..2 {
        let req = h2_req("HEAD", &f.tls_url("secure.test", "/not-in-intent"), b"");
        let resp = h2_send(&mut h2, req).await;
        assert_eq!(resp.status, 403, "{}", resp.text());
        assert_eq!(
            resp.header("x-keyward-reason").as_deref(),
            Some("route_not_in_intent")
        );
        assert!(resp.body.is_empty());
    }
    // The connection goes on: an allowed request after them is answered.
    let resp = h2_send(
        &mut h2,
        h2_req("GET", &f.tls_url("secure.test", "/echo"), b""),
    )
    .await;
    assert_eq!(resp.status, 200);
    kw.assert_no_leaks().await;
}
