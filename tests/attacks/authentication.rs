//! Authentication: who is asking, and whether an agent can pass for another task. Missing,
//! malformed, oversized, duplicated and crossed `Proxy-Authorization` on plain HTTP, CONNECT
//! and inside intercepted tunnels; every invalid form answers exactly the same (no oracle);
//! expired and revoked tasks are refused on the very next request.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

use crate::common::{
    basic, bounded, connect_raw, exchange_head, h1_over, h1_send, h2_over, h2_send, raw_exchange,
    read_response, tls_over, Fixture, Harness, RawResp, Task,
};

const LEAVES: &str = "keyward_tls_leaf_certs_issued_total";

type Fingerprint = (u16, Vec<(String, String)>, Value);

/// What an agent can tell about a denial, with the per-request id taken out: status, headers
/// (but the date, a length that follows the id's digits, and connection management) and the
/// problem document.
fn fingerprint(resp: &RawResp) -> Fingerprint {
    let mut headers: Vec<(String, String)> = resp
        .headers
        .iter()
        // `connection` follows the request's own `Connection: close`.
        .filter(|(n, _)| !matches!(n.as_str(), "date" | "content-length" | "connection"))
        .cloned()
        .collect();
    headers.sort();
    let mut problem: Value = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("not a problem document ({e}): {}", resp.text()));
    problem.as_object_mut().unwrap().remove("request_id");
    (resp.status, headers, problem)
}

/// Every invalid spelling of the proxy credentials, as complete header lines (CRLF-terminated).
/// `a` and `b` are two live tasks.
fn invalid_forms(a: &Task, b: &Task) -> Vec<(&'static str, Vec<u8>)> {
    let line = |v: String| format!("Proxy-Authorization: {v}\r\n").into_bytes();
    let oversized = format!("{}{}", a.token, "A".repeat(16 * 1024));
    let mut latin1 = b"Proxy-Authorization: Basic \xff\xfe".to_vec();
    latin1.extend_from_slice(b"\r\n");
    vec![
        ("unknown task id", line(basic("task-nobody", &a.token))),
        (
            "id of one task, token of another",
            line(basic(&a.id, &b.token)),
        ),
        (
            "truncated token",
            line(basic(&a.id, &a.token[..a.token.len() - 1])),
        ),
        (
            "token with a suffix",
            line(basic(&a.id, &format!("{}x", a.token))),
        ),
        (
            "token without its kw_ prefix",
            line(basic(&a.id, &a.token[3..])),
        ),
        ("empty token", line(basic(&a.id, ""))),
        (
            "task id upper-cased",
            line(basic(&a.id.to_uppercase(), &a.token)),
        ),
        (
            "task id with a trailing space",
            line(basic(&format!("{} ", a.id), &a.token)),
        ),
        (
            "token with a trailing space inside base64",
            line(basic(&a.id, &format!("{} ", a.token))),
        ),
        (
            "token upper-cased",
            line(basic(&a.id, &a.token.to_uppercase())),
        ),
        ("empty id and token", line(basic("", ""))),
        ("no colon", line(format!("Basic {}", B64.encode(&a.token)))),
        (
            "id:token:extra",
            line(basic(&a.id, &format!("{}:extra", a.token))),
        ),
        ("bad base64", line("Basic !!!not-base64!!!".into())),
        (
            "two schemes in one value",
            line(format!("{}, Bearer {}", basic(&a.id, &a.token), a.token)),
        ),
        (
            "base64 with a stray byte",
            line(format!(
                "Basic {}",
                B64.encode(format!("{}:{}", a.id, a.token))
                    .trim_end_matches('=')
                    .to_string()
                    + "%"
            )),
        ),
        ("scheme only", line("Basic".into())),
        ("empty value", line(String::new())),
        ("unknown scheme", line(format!("Digest {}", a.token))),
        ("token without a scheme", line(a.token.clone())),
        (
            "raw id:token without base64",
            line(format!("Basic {}:{}", a.id, a.token)),
        ),
        ("unknown bearer token", line(format!("Bearer {}x", b.token))),
        ("empty bearer", line("Bearer ".into())),
        ("oversized", line(basic(&a.id, &oversized))),
        ("oversized bearer", line(format!("Bearer {oversized}"))),
        ("non-UTF-8 bytes", latin1),
        ("two valid headers", {
            let mut two = line(basic(&a.id, &a.token));
            two.extend(line(basic(&a.id, &a.token)));
            two
        }),
        ("valid then invalid", {
            let mut two = line(basic(&a.id, &a.token));
            two.extend(line(basic(&a.id, "kw_nope")));
            two
        }),
        ("invalid then valid", {
            let mut two = line(basic(&b.id, "kw_nope"));
            two.extend(line(format!("Bearer {}", b.token)));
            two
        }),
        ("two tasks", {
            let mut two = line(basic(&a.id, &a.token));
            two.extend(line(basic(&b.id, &b.token)));
            two
        }),
    ]
}

fn plain_request(f: &Fixture, auth_lines: &[u8]) -> Vec<u8> {
    let port = f.plain.port();
    let mut req = format!(
        "GET http://plain.test:{port}/repos/acme/web/issues HTTP/1.1\r\nHost: plain.test:{port}\r\n"
    )
    .into_bytes();
    req.extend_from_slice(auth_lines);
    req.extend_from_slice(b"Connection: close\r\n\r\n");
    req
}

fn connect_request(f: &Fixture, auth_lines: &[u8]) -> Vec<u8> {
    let authority = format!("secure.test:{}", f.tls.port());
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n").into_bytes();
    req.extend_from_slice(auth_lines);
    req.extend_from_slice(b"\r\n");
    req
}

/// Checks one invalid-credential answer and its record; returns its fingerprint.
async fn check_invalid(kw: &Harness, resp: &RawResp, what: &str) -> Fingerprint {
    kw.saw(&resp.text());
    assert_eq!(resp.status, 407, "{what}: {}", resp.text());
    let (problem, rec) = kw.assert_denied_raw(resp, 407, "invalid_token").await;
    assert_eq!(
        resp.header("proxy-authenticate").as_deref(),
        Some(r#"Basic realm="keyward""#),
        "{what}"
    );
    // Nothing about which task was named: no task, no agent, in the answer or the record.
    assert!(
        matches!(problem.get("task"), None | Some(Value::Null)),
        "{what}: {problem}"
    );
    assert!(rec["task"].is_null(), "{what}: {rec}");
    assert!(rec["agent"].is_null(), "{what}: {rec}");
    fingerprint(resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_proxy_authorization_on_plain_http_gets_the_same_407() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let a = kw.mint("bot", json!(["plain.issues.read"])).await;
    let b = kw.mint("reader", json!(["plain.issues.read"])).await;
    let mut first: Option<Fingerprint> = None;
    for (what, lines) in invalid_forms(&a, &b) {
        let resp = raw_exchange(kw.proxy_addr, &plain_request(&f, &lines)).await;
        let print = check_invalid(kw, &resp, what).await;
        match &first {
            None => first = Some(print),
            Some(p) => assert_eq!(&print, p, "{what} answers differently: an oracle"),
        }
    }
    assert_eq!(
        f.plain.hits(),
        0,
        "an invalid credential reached the upstream"
    );
    // The valid form on the same request is served, so the refusals above were about the
    // credentials alone.
    let ok = kw
        .raw(
            &String::from_utf8(plain_request(
                &f,
                format!("Proxy-Authorization: {}\r\n", Harness::proxy_auth(&a)).as_bytes(),
            ))
            .unwrap(),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let seen = f.plain.last();
    assert!(seen.header("proxy-authorization").is_none());
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_invalid_proxy_authorization_on_connect_gets_the_same_407_and_no_leaf() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let a = kw.mint("bot", json!(["secure.read"])).await;
    let b = kw.mint("bot", json!(["secure.read"])).await;
    // The plain-HTTP answer is the reference: CONNECT must not answer differently either.
    let reference = {
        let lines = format!("Proxy-Authorization: {}\r\n", basic("task-nobody", "kw_x"));
        let resp = raw_exchange(kw.proxy_addr, &plain_request(&f, lines.as_bytes())).await;
        check_invalid(kw, &resp, "reference").await
    };
    for (what, lines) in invalid_forms(&a, &b) {
        let (mut tcp, resp) = exchange_head(kw.proxy_addr, &connect_request(&f, &lines)).await;
        let print = check_invalid(kw, &resp, what).await;
        assert_eq!(print, reference, "CONNECT with {what} answers differently");
        // No TLS is offered after the refusal: a ClientHello is not answered with a handshake.
        let tls = tls_over(&mut tcp, "secure.test", &kw.ca_pem(), &[b"http/1.1"]).await;
        assert!(
            tls.is_err(),
            "{what}: a TLS session after a refused CONNECT"
        );
    }
    assert_eq!(
        kw.metric(LEAVES).await,
        Some(0.0),
        "a leaf for a refused CONNECT"
    );
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_proxy_authorization_answers_alike_on_plain_http_and_connect() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let plain = raw_exchange(kw.proxy_addr, &plain_request(&f, b"")).await;
    kw.saw(&plain.text());
    kw.assert_denied_raw(&plain, 407, "missing_credentials")
        .await;
    // Look-alike headers are not credentials.
    let lookalikes = [
        format!("Authorization: {}\r\n", basic("x", "y")),
        format!("Proxy_Authorization: {}\r\n", basic("x", "y")),
        format!("X-Proxy-Authorization: {}\r\n", basic("x", "y")),
    ];
    let reference = fingerprint(&plain);
    for lines in &lookalikes {
        let resp = raw_exchange(kw.proxy_addr, &plain_request(&f, lines.as_bytes())).await;
        kw.saw(&resp.text());
        kw.assert_denied_raw(&resp, 407, "missing_credentials")
            .await;
        assert_eq!(fingerprint(&resp), reference, "{lines}");
        let (_, head) = exchange_head(kw.proxy_addr, &connect_request(&f, lines.as_bytes())).await;
        kw.saw(&head.text());
        kw.assert_denied_raw(&head, 407, "missing_credentials")
            .await;
        assert_eq!(fingerprint(&head), reference, "CONNECT with {lines}");
    }
    assert_eq!(f.plain.hits() + f.tls.hits(), 0);
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_target_userinfo_are_neither_accepted_nor_recorded() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    // Without Proxy-Authorization: the userinfo is not a credential.
    let resp = kw
        .raw(&format!(
            "GET http://{}:{}@plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nConnection: close\r\n\r\n",
            task.id, task.token
        ))
        .await;
    kw.assert_denied_raw(&resp, 407, "missing_credentials")
        .await;
    // With valid Proxy-Authorization the userinfo is still refused, never forwarded.
    let resp = kw
        .raw(&format!(
            "GET http://{}:{}@plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            task.id,
            task.token,
            Harness::proxy_auth(&task)
        ))
        .await;
    let (problem, _) = kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("(userinfo)"),
        "{problem}"
    );
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_authorization_inside_a_tunnel_cannot_change_the_tunnels_task() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    // The tunnel's task may read acme/web only; the other task may read anything.
    let narrow = kw
        .mint(
            "bot",
            json!([{"capability": "secure.read", "where": {"owner": "acme", "repo": "web"}}]),
        )
        .await;
    let broad = kw.mint("bot", json!(["secure.read"])).await;
    let authority = format!("secure.test:{}", f.tls.port());
    let (tcp, head) = connect_raw(
        kw.proxy_addr,
        &authority,
        Some(&Harness::proxy_auth(&narrow)),
    )
    .await;
    assert_eq!(head.status, 200, "{}", head.text());
    let tls = tls_over(tcp, "secure.test", &kw.ca_pem(), &[b"http/1.1"])
        .await
        .unwrap();
    let mut conn = h1_over(tls).await;
    let req = |path: &str, auth: String| {
        http::Request::builder()
            .uri(path)
            .header("host", &authority)
            .header("proxy-authorization", auth)
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let resp = h1_send(
        &mut conn,
        req("/repos/evil/web/issues", Harness::proxy_auth(&broad)),
    )
    .await;
    kw.saw(&resp.text());
    let (_, rec) = kw
        .assert_denied_raw(&resp, 403, "constraint_mismatch")
        .await;
    assert_eq!(rec["task"], narrow.id.as_str(), "{rec}");
    // A garbage credential inside the tunnel is no reason to refuse the tunnel's own request,
    // and is not forwarded.
    let resp = h1_send(
        &mut conn,
        req("/repos/acme/web/issues", format!("Bearer {}", broad.token)),
    )
    .await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = f.tls.last();
    assert!(seen.header("proxy-authorization").is_none(), "{seen:?}");
    assert!(!seen.headers.iter().any(|(_, v)| v.contains(&broad.token)));
    assert_eq!(f.tls.hits(), 1);
    let rec = kw
        .audit_where("the allowed request", |r| r["reason"] == "allowed")
        .await;
    assert_eq!(rec["task"], narrow.id.as_str(), "{rec}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_authorization_on_an_http2_stream_cannot_change_the_tunnels_task() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let narrow = kw
        .mint(
            "bot",
            json!([{"capability": "secure.read", "where": {"owner": "acme", "repo": "web"}}]),
        )
        .await;
    let broad = kw.mint("bot", json!(["secure.read"])).await;
    let authority = format!("secure.test:{}", f.tls.port());
    let (tcp, head) = connect_raw(
        kw.proxy_addr,
        &authority,
        Some(&Harness::proxy_auth(&narrow)),
    )
    .await;
    assert_eq!(head.status, 200, "{}", head.text());
    let tls = tls_over(tcp, "secure.test", &kw.ca_pem(), &[b"h2"])
        .await
        .unwrap();
    let mut conn = h2_over(tls).await;
    let req = |path: &str| {
        http::Request::builder()
            .version(http::Version::HTTP_2)
            .uri(format!("https://{authority}{path}"))
            .header("proxy-authorization", Harness::proxy_auth(&broad))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap()
    };
    let resp = h2_send(&mut conn, req("/repos/evil/web/issues")).await;
    kw.saw(&resp.text());
    let (_, rec) = kw
        .assert_denied_raw(&resp, 403, "constraint_mismatch")
        .await;
    assert_eq!(rec["task"], narrow.id.as_str(), "{rec}");
    let resp = h2_send(&mut conn, req("/repos/acme/web/issues")).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = f.tls.last();
    assert!(seen.header("proxy-authorization").is_none(), "{seen:?}");
    assert_eq!(f.tls.hits(), 1);
    kw.assert_no_leaks().await;
}

/// SECURITY (I3): a plain connection's identity is fixed by the first task that
/// authenticates on it, as a tunnel's is by its CONNECT: another task's request on it gets a
/// 407 and the connection closes (no task rides a connection place another holds). The other
/// task's own connection works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tasks_request_on_a_held_plain_connection_is_refused_and_closes_it() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let first = kw.mint("bot", json!(["plain.issues.read"])).await;
    let other = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let request = |task: &Task| {
        format!(
            "GET http://plain.test:{port}/repos/acme/web/issues HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\n\r\n",
            Harness::proxy_auth(task)
        )
    };
    let mut tcp = bounded("connect", tokio::net::TcpStream::connect(kw.proxy_addr))
        .await
        .unwrap();
    bounded("write", tcp.write_all(request(&first).as_bytes()))
        .await
        .unwrap();
    let resp = read_response(&mut tcp).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200, "{}", resp.text());
    bounded("write", tcp.write_all(request(&other).as_bytes()))
        .await
        .unwrap();
    let resp = read_response(&mut tcp).await;
    kw.saw(&resp.text());
    let (problem, rec) = kw.assert_denied_raw(&resp, 407, "invalid_token").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("belongs to another task"),
        "{problem}"
    );
    assert_eq!(rec["task"], other.id.as_str());
    assert_eq!(resp.header("connection").as_deref(), Some("close"));
    let mut rest = Vec::new();
    let _ = bounded(
        "closed",
        tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest),
    )
    .await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    assert_eq!(f.plain.hits(), 1);
    let own = kw
        .raw(&request(&other).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n"))
        .await;
    assert_eq!(own.status, 200, "{}", own.text());
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_task_is_refused_on_a_kept_alive_plain_connection_and_at_connect() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["plain.issues.read", "secure.read"]))
        .await;
    let port = f.plain.port();
    let request = format!(
        "GET http://plain.test:{port}/repos/acme/web/issues HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\n\r\n",
        Harness::proxy_auth(&task)
    );
    let mut tcp = bounded("connect", tokio::net::TcpStream::connect(kw.proxy_addr))
        .await
        .unwrap();
    bounded("write", tcp.write_all(request.as_bytes()))
        .await
        .unwrap();
    let first = read_response(&mut tcp).await;
    kw.saw(&first.text());
    assert_eq!(first.status, 200, "{}", first.text());
    kw.revoke(&task.id).await;
    bounded("write", tcp.write_all(request.as_bytes()))
        .await
        .unwrap();
    let second = read_response(&mut tcp).await;
    kw.saw(&second.text());
    let (problem, rec) = kw.assert_denied_raw(&second, 407, "task_revoked").await;
    assert_eq!(problem["task"], task.id.as_str());
    assert_eq!(rec["task"], task.id.as_str());
    // Bearer with the same token, and a new CONNECT: refused too.
    let bearer = kw
        .raw(&format!(
            "GET http://plain.test:{port}/repos/acme/web/issues HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: Bearer {}\r\nConnection: close\r\n\r\n",
            task.token
        ))
        .await;
    kw.assert_denied_raw(&bearer, 407, "task_revoked").await;
    let (_, head) = connect_raw(
        kw.proxy_addr,
        &format!("secure.test:{}", f.tls.port()),
        Some(&Harness::proxy_auth(&task)),
    )
    .await;
    kw.saw(&head.text());
    kw.assert_denied_raw(&head, 407, "task_revoked").await;
    assert_eq!(f.plain.hits(), 1);
    assert_eq!(f.tls.hits(), 0);
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_task_is_refused_on_plain_http_and_at_connect() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let (status, v) = kw
        .mint_body(
            json!({"agent": "bot", "intent": ["plain.issues.read", "secure.read"], "ttl": "1s"}),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    let task = Task {
        id: v["task"].as_str().unwrap().to_string(),
        token: v["token"].as_str().unwrap().to_string(),
    };
    let port = f.plain.port();
    let get = |path: &str| {
        format!(
            "GET http://plain.test:{port}{path} HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            Harness::proxy_auth(&task)
        )
    };
    // A request of the task waits on an upstream that answers in 30 s.
    let mut stalled = tokio::net::TcpStream::connect(kw.proxy_addr).await.unwrap();
    stalled.write_all(get("/stall").as_bytes()).await.unwrap();
    // Task expiry is wall-clock time: the task expires at most 1 s after this answer.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let resp = kw.raw(&get("/repos/acme/web/issues")).await;
    kw.assert_denied_raw(&resp, 407, "task_expired").await;
    let (_, head) = connect_raw(
        kw.proxy_addr,
        &format!("secure.test:{}", f.tls.port()),
        Some(&Harness::proxy_auth(&task)),
    )
    .await;
    kw.saw(&head.text());
    kw.assert_denied_raw(&head, 407, "task_expired").await;
    // Revoking a task that has already expired changes nothing: it ended by expiry, and says
    // so (status and reason alike).
    let (status, v) = kw
        .admin(
            http::Method::DELETE,
            &format!("/v1/tasks/{}", task.id),
            None,
        )
        .await;
    assert_eq!((status, &v["status"]), (200, &json!("expired")), "{v}");
    // ...but what it still had in flight is cut at once, as for any revocation.
    let mut answer = Vec::new();
    let _ = bounded(
        "the stalled request's answer",
        tokio::io::AsyncReadExt::read_to_end(&mut stalled, &mut answer),
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 407"), "{answer}");
    let resp = kw.raw(&get("/repos/acme/web/issues")).await;
    kw.assert_denied_raw(&resp, 407, "task_expired").await;
    // Only the request made before the expiry reached an upstream.
    assert_eq!((f.plain.hits(), f.tls.hits()), (1, 0));
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    kw.assert_no_leaks().await;
}

/// A tunnel belongs to the task it was opened by, not to its id: once that task ended and was
/// forgotten, and another was minted under the same id, the old tunnel's refusals are that old
/// task's. They name it, and neither count against nor show up on the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_tunnels_refusals_are_not_the_new_task_of_the_same_id() {
    let f = Fixture::start_with(|p| {
        p.replacen(
            "  token: file:admin-token\n",
            "  token: file:admin-token\n  max_tasks: 1\n",
            1,
        )
    })
    .await;
    let kw = &f.kw;
    let mint = json!({"agent": "bot", "task": "reused", "intent": ["secure.read"]});
    let old = kw.mint_with(mint.clone()).await;
    let mut tunnel = crate::common::tunnel_tls(&f, &old, "secure.test", &[b"http/1.1"]).await;
    let get = format!(
        "GET /repos/acme/web/issues HTTP/1.1\r\nHost: secure.test:{}\r\n\r\n",
        f.tls.port()
    );
    bounded("write", tunnel.write_all(get.as_bytes()))
        .await
        .unwrap();
    let first = read_response(&mut tunnel).await;
    assert_eq!(first.status, 200, "{}", first.text());
    kw.revoke(&old.id).await;
    // The store holds one task: each mint forgets the ended one to make room, and the id is
    // free again once forgotten.
    let filler = kw
        .mint_with(json!({"agent": "bot", "task": "filler", "intent": ["secure.read"]}))
        .await;
    kw.revoke(&filler.id).await;
    let new = kw.mint_with(mint).await;
    assert_ne!(new.token, old.token);
    bounded("write", tunnel.write_all(get.as_bytes()))
        .await
        .unwrap();
    let second = read_response(&mut tunnel).await;
    kw.saw(&second.text());
    assert_eq!(second.status, 407, "{}", second.text());
    let (status, listed) = kw.admin(http::Method::GET, "/v1/tasks/reused", None).await;
    assert_eq!(status, 200, "{listed}");
    assert_eq!(listed["status"], "active", "{listed}");
    assert_eq!(listed["requests_denied"], 0, "{listed}");
    // The new task works, its budget untouched by the old tunnel.
    let resp = kw
        .send(kw.agent(&new).get(f.plain_url("plain.test", "/echo")))
        .await;
    assert_ne!(resp.status, 407);
    kw.assert_no_leaks().await;
}
