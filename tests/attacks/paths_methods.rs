//! Paths and methods: every ambiguous form of SPEC §4.4 is refused before the upstream, on plain
//! HTTP, inside intercepted tunnels and on HTTP/2 streams, with the precise code; `{param}` and
//! `{*rest}` constraints cannot be escaped by encoding, case or separators; methods are
//! case-sensitive, `TRACE`/`TRACK` are never allowed, and method-override headers (and their `_`
//! spellings) are refused. Fragments are cut off by the request-target parser before keyward
//! sees them; the case here proves they are never forwarded and never change the decision.

use bytes::Bytes;
use http_body_util::Full;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::common::{
    bounded, connect_raw, extend_policy, h2_over, h2_send, raw_exchange, read_response, tls_over,
    Fixture, Harness, RawResp, Task,
};

/// Paths around the route `GET /repos/{owner}/{repo}/issues` that servers could read two
/// ways, with the code keyward names.
fn ambiguous_paths() -> Vec<(String, &'static str)> {
    let mut cases: Vec<(String, &'static str)> = [
        ("/repos/acme/web/../web/issues", "dot_segment"),
        ("/repos/acme/web/./issues", "dot_segment"),
        ("/repos/acme/web/issues/..", "dot_segment"),
        ("/repos/acme/web/issues/.", "dot_segment"),
        ("/./repos/acme/web/issues", "dot_segment"),
        ("/repos/acme/web/%2e%2e/web/issues", "dot_segment"),
        ("/repos/acme/web/%2E%2E/web/issues", "dot_segment"),
        ("/repos/acme/web/.%2e/web/issues", "dot_segment"),
        ("/repos/acme/web/%2e./web/issues", "dot_segment"),
        ("/repos/acme/%2e/web/issues", "dot_segment"),
        ("/repos/acme/web/issues/%2E", "dot_segment"),
        ("/repos/acme/web/..%20/web/issues", "dot_segment"),
        ("/repos/acme/web/%C2%A0../web/issues", "dot_segment"),
        ("/repos/acme/web/..%E3%80%80/web/issues", "dot_segment"),
        ("/repos/acme/.../issues", "dot_segment"),
        ("/repos/acme/web/..+/web/issues", "dot_segment"),
        ("/repos/acme%2Fweb/x/issues", "encoded_slash"),
        ("/repos/acme%2fweb/x/issues", "encoded_slash"),
        ("/repos/acme/web%2F..%2F..%2Fadmin/issues", "encoded_slash"),
        ("/repos/acme%5Cweb/issues", "encoded_backslash"),
        ("/repos/acme%5cweb/issues", "encoded_backslash"),
        ("/repos/acme\\web/issues", "backslash"),
        ("/repos/acme/web/issues\\..\\labels", "backslash"),
        ("/repos/acme%252Fweb/issues", "encoded_percent"),
        ("/repos/acme/web/%252e%252e/issues", "encoded_percent"),
        ("/repos/acme/web/issues%25", "encoded_percent"),
        // A decoding hop (nginx `$uri`, Apache `[P]`) would cut the path at these.
        ("/repos/acme/web/issues%3F/labels", "encoded_delimiter"),
        ("/repos/acme/web/issues%3f", "encoded_delimiter"),
        ("/repos/acme/web/issues%23/labels", "encoded_delimiter"),
        ("/repos/acme;x=1/web/issues", "semicolon"),
        ("/repos/acme/web/issues;", "semicolon"),
        ("/repos/acme/web/issues/..;/labels", "semicolon"),
        ("/repos/acme/web;/issues", "semicolon"),
        ("/repos/acme%3Bx/web/issues", "semicolon"),
        ("/repos/acme%3bx/web/issues", "semicolon"),
        ("//repos/acme/web/issues", "empty_segment"),
        ("/repos//acme/web/issues", "empty_segment"),
        ("/repos/acme/web//issues", "empty_segment"),
        ("/repos/acme/web/issues//", "empty_segment"),
        ("/repos/acme/web/issues%", "malformed_percent"),
        ("/repos/acme/web/issues%zz", "malformed_percent"),
        ("/repos/acme/web/issues%4", "malformed_percent"),
        ("/repos/acme/web/issues%G1", "malformed_percent"),
        ("/repos/acme/web/%%32%65/issues", "malformed_percent"),
        ("/repos/acme/%c0%ae%c0%ae/web/issues", "invalid_utf8"),
        ("/repos/acme/%e0%80%ae%e0%80%ae/issues", "invalid_utf8"),
        ("/repos/acme%c0%afweb/issues", "invalid_utf8"),
        ("/repos/acme/%c0%2e%c0%2e/issues", "invalid_utf8"),
        ("/repos/acme/%ef%bc%8e%ef%bc%8e/issues", "lookalike"),
        ("/repos/acme%EF%BC%8Fweb/issues", "lookalike"),
        ("/repos/acme/web/issues%00", "control_byte"),
        ("/repos/acme/web/issues%0a", "control_byte"),
        (
            "/repos/acme/web/issues%0D%0AX-Injected:%201",
            "control_byte",
        ),
        ("/repos/acme/web/issues%09", "control_byte"),
        ("/repos/acme/web/issues%1F", "control_byte"),
        ("/repos/acme/web/issues%7f", "control_byte"),
        ("/repos/acme/web/issues%C2%85", "control_byte"),
        ("/repos/acme/web/issues%c2%9f", "control_byte"),
    ]
    .iter()
    .map(|(p, c)| (p.to_string(), *c))
    .collect();
    cases.push((
        format!("/repos/acme/web/issues/{}", "a".repeat(9000)),
        "too_long",
    ));
    cases.push((
        format!("/repos/acme/web/issues{}", "/a".repeat(130)),
        "too_long",
    ));
    cases
}

/// Checks a refusal as ambiguous with `code` in its detail, and its record.
async fn assert_ambiguous(kw: &Harness, resp: &RawResp, code: &str, what: &str) {
    assert_eq!(resp.status, 400, "{what}: {}", resp.text());
    let (problem, rec) = kw.assert_denied_raw(resp, 400, "ambiguous_request").await;
    let detail = problem["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("({code})")),
        "{what}: expected {code}: {detail}"
    );
    // The record says what precisely was refused, as the problem does; it names the request
    // but never more than its path, and the problem never echoes the path back.
    assert_eq!(rec["detail"], code, "{what}: {rec}");
    assert!(!rec["path"].as_str().unwrap_or("").contains('?'), "{rec}");
    assert!(
        !detail.contains("repos"),
        "{what}: the detail echoes the target: {detail}"
    );
}

fn plain_get(f: &Fixture, method: &str, path: &str, task: &Task, extra: &str) -> String {
    let port = f.plain.port();
    format!(
        "{method} http://plain.test:{port}{path} HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n",
        Harness::proxy_auth(task)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ambiguous_path_form_is_refused_on_plain_http() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["plain.issues.read", "plain.labels.write"]))
        .await;
    for (path, code) in ambiguous_paths() {
        let resp = kw.raw(&plain_get(&f, "GET", &path, &task, "")).await;
        assert_ambiguous(kw, &resp, code, &path).await;
        assert_eq!(f.plain.hits(), 0, "{path} reached the upstream");
    }
    // Ambiguous requests use no budget, and the canonical request is served.
    let (_, t) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(t["requests_used"], 0, "{t}");
    let ok = kw
        .raw(&plain_get(&f, "GET", "/repos/acme/web/issues", &task, ""))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    kw.assert_no_leaks().await;
}

/// Writes `head` inside a fresh intercepted HTTP/1.1 tunnel to `secure.test` and reads the
/// answer.
async fn in_tunnel(f: &Fixture, task: &Task, head: &str) -> RawResp {
    let mut tls = crate::common::tunnel_tls(f, task, "secure.test", &[b"http/1.1"]).await;
    bounded("write", tls.write_all(head.as_bytes()))
        .await
        .unwrap();
    // rustls keeps what the socket did not take yet: flush, or a long head may never leave.
    bounded("flush", tls.flush()).await.unwrap();
    let resp = read_response(&mut tls).await;
    f.kw.saw(&resp.text());
    resp
}

fn tunnel_get(f: &Fixture, method: &str, path: &str, extra: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: secure.test:{}\r\n{extra}Content-Length: 0\r\n\r\n",
        f.tls.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ambiguous_path_form_is_refused_inside_an_intercepted_tunnel() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    for (path, code) in ambiguous_paths() {
        let resp = in_tunnel(&f, &task, &tunnel_get(&f, "GET", &path, "")).await;
        assert_ambiguous(kw, &resp, code, &path).await;
        assert_eq!(f.tls.hits(), 0, "{path} reached the upstream");
    }
    // Asterisk-form inside a tunnel is not a path either.
    let resp = in_tunnel(&f, &task, &tunnel_get(&f, "OPTIONS", "*", "")).await;
    assert_ambiguous(kw, &resp, "not_origin_form", "OPTIONS *").await;
    assert_eq!(f.tls.hits(), 0);
    let ok = in_tunnel(
        &f,
        &task,
        &tunnel_get(&f, "GET", "/repos/acme/web/issues", ""),
    )
    .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_ambiguous_path_form_is_refused_on_an_http2_stream() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let authority = format!("secure.test:{}", f.tls.port());
    let (tcp, head) =
        connect_raw(kw.proxy_addr, &authority, Some(&Harness::proxy_auth(&task))).await;
    assert_eq!(head.status, 200);
    let tls = tls_over(tcp, "secure.test", &kw.ca_pem(), &[b"h2"])
        .await
        .unwrap();
    let mut h2 = h2_over(tls).await;
    let mut sent = 0;
    for (path, code) in ambiguous_paths() {
        // Paths the `http` crate cannot even hold as a URI cannot be sent as `:path` here.
        let Ok(uri) = format!("https://{authority}{path}").parse::<http::Uri>() else {
            continue;
        };
        let req = http::Request::builder()
            .version(http::Version::HTTP_2)
            .uri(uri)
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = h2_send(&mut h2, req).await;
        kw.saw(&resp.text());
        assert_ambiguous(kw, &resp, code, &path).await;
        sent += 1;
    }
    assert!(sent >= 40, "only {sent} ambiguous paths were sent as :path");
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_control_bytes_and_non_ascii_in_the_target_never_reach_the_upstream() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let mut unparsed = 0;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let auth = Harness::proxy_auth(&task);
    let targets: [&[u8]; 8] = [
        b"/repos/acme/web/issues\x0bx",
        b"/repos/acme/web/issues\x1b[0m",
        b"/repos/acme/web/issues\x00",
        b"/repos/acme/web/issues\x01x",
        b"/repos/acme/web/issues\x7f",
        b"/repos/acme/web/issues\tx",
        b"/repos/acme/web/issues\rx",
        b"/repos/acm\xc3\xa9/web/issues",
    ];
    for target in targets {
        let mut req = format!("GET http://plain.test:{port}").into_bytes();
        req.extend_from_slice(target);
        req.extend_from_slice(
            format!(" HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        let resp = raw_exchange(kw.proxy_addr, &req).await;
        kw.saw(&resp.text());
        let what = String::from_utf8_lossy(target).into_owned();
        assert_eq!(resp.status, 400, "{what:?}: {}", resp.text());
        // keyward names its reason; a target hyper cannot parse is refused by hyper before
        // keyward sees it. Either way the request leaves exactly one record.
        if resp.header("x-keyward-reason").is_some() {
            kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
        } else {
            unparsed += 1;
            let recs = kw
                .audit_count(unparsed, |r| r["outcome"] == "unparsed")
                .await;
            assert_eq!(recs.len(), unparsed, "{what:?}");
            let rec = recs.last().unwrap();
            crate::common::assert_record(rec);
            assert_eq!(rec["reason"], "ambiguous_request", "{rec}");
            assert_eq!(rec["status"], 400, "{rec}");
        }
        assert_eq!(f.plain.hits(), 0, "{what:?} reached the upstream");
    }
    assert!(
        unparsed > 0,
        "no target was refused by the parser: the case lost its point"
    );
    // Inside a tunnel, the same: refused, never forwarded, and recorded.
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let resp = in_tunnel(&f, &task, &tunnel_get(&f, "GET", "/echo\x01x", "")).await;
    assert_eq!(resp.status, 400, "{}", resp.text());
    let recs = kw
        .audit_count(unparsed + 1, |r| r["outcome"] == "unparsed")
        .await;
    assert_eq!(recs.len(), unparsed + 1);
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

/// SPEC §4.4: a fragment in the request target is refused as ambiguous, never cut off and
/// forwarded. The `http` crate drops it while parsing, so keyward sees it in the connection's
/// bytes (`proxy::fragment`); every spelling, on the plain listener and inside a tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_in_the_target_is_refused_as_ambiguous() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["plain.issues.read", "secure.read"]))
        .await;
    let targets = [
        "/repos/acme/web/issues#/../../labels",
        "/repos/acme/web/issues#frag",
        "/repos/acme/web/issues#",
        "/repos/acme/web/labels#/../issues",
        "/repos/acme/web/issues?x=1#/../../labels",
        "/repos/acme/web/issues?x=1#",
    ];
    for target in targets {
        let resp = kw.raw(&plain_get(&f, "GET", target, &task, "")).await;
        assert_ambiguous(kw, &resp, "fragment", target).await;
    }
    // A request line just longer than the sniffer keeps, and a request whose own body is full
    // of fragment-bearing lines (which once pushed its note out).
    // (line length 16,389: the kept 16,384 bytes already hold the space before `HTTP/1.1`)
    let long = format!("/echo?q={}#frag", "a".repeat(16_340));
    let resp = kw.raw(&plain_get(&f, "GET", &long, &task, "")).await;
    assert_ambiguous(kw, &resp, "fragment", "a 16 KiB request line").await;
    let body: String = (0..80).map(|i| format!("GET /z{i}#x HTTP/1.1\n")).collect();
    let port = f.plain.port();
    let resp = kw
        .raw(&format!(
            "POST http://plain.test:{port}/echo#frag HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            Harness::proxy_auth(&task),
            body.len()
        ))
        .await;
    assert_ambiguous(kw, &resp, "fragment", "a body of fragment lines").await;
    assert_eq!(f.plain.hits(), 0, "a request with a fragment was forwarded");
    for target in targets {
        let resp = in_tunnel(&f, &task, &tunnel_get(&f, "GET", target, "")).await;
        assert_ambiguous(kw, &resp, "fragment", target).await;
    }
    // A tunnel speaks what ALPN chose: HTTP/1.1 sent after choosing h2 (whose heads cannot be
    // sniffed for fragments) is not served as HTTP/1.1.
    let mut tls = crate::common::tunnel_tls(&f, &task, "secure.test", &[b"h2"]).await;
    let head = tunnel_get(&f, "GET", "/repos/acme/web/issues#frag", "");
    bounded("write", tls.write_all(head.as_bytes()))
        .await
        .unwrap();
    bounded("flush", tls.flush()).await.unwrap();
    let mut back = Vec::new();
    let _ = bounded(
        "the tunnel to close",
        tokio::io::AsyncReadExt::read_to_end(&mut tls, &mut back),
    )
    .await;
    assert!(
        !back.starts_with(b"HTTP/1.1"),
        "{:?}",
        String::from_utf8_lossy(&back)
    );
    assert_eq!(f.tls.hits(), 0, "a request with a fragment was forwarded");
    kw.assert_no_leaks().await;
}

/// A request pipelined right after a body without a final newline starts mid-line for a
/// line reader (`abcGET /x#y HTTP/1.1`): its fragment is still refused, in a tunnel too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragment_right_after_a_body_without_a_newline_is_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut tls = crate::common::tunnel_tls(&f, &task, "secure.test", &[b"http/1.1"]).await;
    let port = f.tls.port();
    let both = format!(
        "POST /echo HTTP/1.1\r\nHost: secure.test:{port}\r\nContent-Length: 3\r\n\r\nabc\
         GET /repos/acme/web/issues#y HTTP/1.1\r\nHost: secure.test:{port}\r\nContent-Length: 0\r\n\r\n"
    );
    bounded("write", tls.write_all(both.as_bytes()))
        .await
        .unwrap();
    bounded("flush", tls.flush()).await.unwrap();
    let first = read_response(&mut tls).await;
    kw.saw(&first.text());
    assert_eq!(first.status, 200, "{}", first.text());
    let second = read_response(&mut tls).await;
    kw.saw(&second.text());
    assert_ambiguous(kw, &second, "fragment", "glued to a body").await;
    assert_eq!(f.tls.hits(), 1, "only the POST reached the upstream");
    kw.assert_no_leaks().await;
}

/// The fragment check looks at request lines only: a `#` in a header, a query value
/// (`%23`) or a body changes nothing, and a refused request does not taint the next one on the
/// same connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hashes_elsewhere_and_later_requests_are_not_mistaken_for_fragments() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut tls = crate::common::tunnel_tls(&f, &task, "secure.test", &[b"http/1.1"]).await;
    let port = f.tls.port();
    let heads = [
        (format!("GET /repos/acme/web/issues#x HTTP/1.1\r\nHost: secure.test:{port}\r\nContent-Length: 0\r\n\r\n"), 400),
        (format!("GET /repos/acme/web/issues HTTP/1.1\r\nHost: secure.test:{port}\r\nX-Tag: #1\r\nContent-Length: 0\r\n\r\n"), 200),
        (format!("GET /repos/acme/web/issues?q=%23x HTTP/1.1\r\nHost: secure.test:{port}\r\nContent-Length: 0\r\n\r\n"), 200),
        (format!("GET /repos/acme/web/issues HTTP/1.1\r\nHost: secure.test:{port}\r\nContent-Length: 26\r\n\r\nGET /x#y HTTP/1.1\r\n# note\n"), 200),
        (format!("GET /repos/acme/web/issues HTTP/1.1\r\nHost: secure.test:{port}\r\nContent-Length: 0\r\n\r\n"), 200),
    ];
    for (i, (head, status)) in heads.iter().enumerate() {
        bounded("write", tls.write_all(head.as_bytes()))
            .await
            .unwrap();
        bounded("flush", tls.flush()).await.unwrap();
        let resp = read_response(&mut tls).await;
        kw.saw(&resp.text());
        assert_eq!(resp.status, *status, "request {i}: {}", resp.text());
    }
    assert_eq!(f.tls.hits(), 4);
    assert!(f.tls.last().path.ends_with("/issues"));
    kw.assert_no_leaks().await;
}

/// The standard policy plus a `{*rest}` route, and an agent for it.
async fn fixture_with_rest_route() -> Fixture {
    Fixture::start_with(|p| {
        extend_policy(
            &p,
            "",
            "  plain.files.read:\n    service: plain\n    risk: low\n    routes: [\"GET /files/{owner}/{*path}\"]\n",
            "  filebot:\n    owner: tests\n    capabilities: [plain.files.read, plain.issues.read]\n    max_ttl: 1h\n",
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn param_constraints_cannot_be_escaped_by_encoding_case_or_separators() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint(
            "bot",
            json!([{"capability": "plain.issues.read", "where": {"owner": "acme", "repo": "web"}}]),
        )
        .await;
    // Encoded unreserved characters are decoded for matching; the bytes go upstream as sent.
    for path in [
        "/repos/acme/web/issues",
        "/repos/%61cme/web/issues",
        "/repos/acme/we%62/issues/1",
        "/repos/acme/web/issues?owner=evil&repo=other",
    ] {
        let resp = kw.raw(&plain_get(&f, "GET", path, &task, "")).await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        assert_eq!(
            f.plain.last().path,
            path,
            "forwarded bytes differ from the received ones"
        );
    }
    let served = f.plain.hits();
    let cases = [
        ("/repos/ACME/web/issues", 403, "constraint_mismatch"),
        ("/repos/acme/Web/issues", 403, "constraint_mismatch"),
        ("/repos/%41cme/web/issues", 403, "constraint_mismatch"),
        ("/repos/acme-/web/issues", 403, "constraint_mismatch"),
        ("/repos/acme%20/web/issues", 403, "constraint_mismatch"),
        ("/repos/acme/web.git/issues", 403, "constraint_mismatch"),
        ("/repos/acm%C3%A9/web/issues", 403, "constraint_mismatch"),
        (
            "/repos/evil/web/issues?owner=acme",
            403,
            "constraint_mismatch",
        ),
        ("/repos/acme/web%2Fevil/issues", 400, "ambiguous_request"),
        (
            "/repos/evil/web/issues/../../../acme/web/issues",
            400,
            "ambiguous_request",
        ),
        ("/repos/acme/web/issues/", 403, "route_not_in_intent"),
        (
            "/repos/acme/web/issues/1/comments",
            403,
            "route_not_in_intent",
        ),
        ("/repos/acme/web", 403, "route_not_in_intent"),
    ];
    for (path, status, reason) in cases {
        let resp = kw.raw(&plain_get(&f, "GET", path, &task, "")).await;
        kw.assert_denied_raw(&resp, status, reason).await;
    }
    assert_eq!(f.plain.hits(), served);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_constraints_cannot_be_escaped() {
    let f = fixture_with_rest_route().await;
    let kw = &f.kw;
    let owner_only = kw
        .mint(
            "filebot",
            json!([{"capability": "plain.files.read", "where": {"owner": "acme"}}]),
        )
        .await;
    let one_file = kw
        .mint(
            "filebot",
            json!([{"capability": "plain.files.read", "where": {"owner": "acme", "path": "docs/readme.md"}}]),
        )
        .await;
    for (task, path) in [
        (&owner_only, "/files/acme/a"),
        (&owner_only, "/files/acme/a/b/c.txt"),
        (&one_file, "/files/acme/docs/readme.md"),
        (&one_file, "/files/acme/docs/%72eadme.md"),
    ] {
        let resp = kw.raw(&plain_get(&f, "GET", path, task, "")).await;
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        assert_eq!(f.plain.last().path, path);
    }
    let served = f.plain.hits();
    let cases = [
        (&owner_only, "/files/evil/a", 403, "constraint_mismatch"),
        (
            &owner_only,
            "/files/acme/../evil/a",
            400,
            "ambiguous_request",
        ),
        (
            &owner_only,
            "/files/acme/%2e%2e/evil/a",
            400,
            "ambiguous_request",
        ),
        (
            &owner_only,
            "/files/acme%2F..%2Fevil/a",
            400,
            "ambiguous_request",
        ),
        (&owner_only, "/files/acme//evil/a", 400, "ambiguous_request"),
        (
            &owner_only,
            "/files/acme/a/../../evil/b",
            400,
            "ambiguous_request",
        ),
        (
            &owner_only,
            "/files/acme/a;/../../evil",
            400,
            "ambiguous_request",
        ),
        (
            &owner_only,
            "/files/acme/a\\..\\..\\evil",
            400,
            "ambiguous_request",
        ),
        (
            &one_file,
            "/files/acme/docs/readme.md/../../secret",
            400,
            "ambiguous_request",
        ),
        (
            &one_file,
            "/files/acme/docs/readme.md2",
            403,
            "constraint_mismatch",
        ),
        (
            &one_file,
            "/files/acme/docs/readme.md/x",
            403,
            "constraint_mismatch",
        ),
        (&one_file, "/files/acme/docs", 403, "constraint_mismatch"),
        (
            &one_file,
            "/files/acme/docs%2Freadme.md",
            400,
            "ambiguous_request",
        ),
        (
            &one_file,
            "/files/acme/Docs/readme.md",
            403,
            "constraint_mismatch",
        ),
        (
            &one_file,
            "/files/acme/docs/readme.md/",
            403,
            "constraint_mismatch",
        ),
        (
            &one_file,
            "/files/acme/other/../docs/readme.md",
            400,
            "ambiguous_request",
        ),
    ];
    for (task, path, status, reason) in cases {
        let resp = kw.raw(&plain_get(&f, "GET", path, task, "")).await;
        let (_, rec) = kw.assert_denied_raw(&resp, status, reason).await;
        assert_eq!(rec["task"], task.id.as_str(), "{path}");
    }
    assert_eq!(f.plain.hits(), served);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_are_case_sensitive_and_trace_track_are_never_allowed() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    // `/echo` allows GET|POST; `/repos/{owner}/{repo}/issues` allows GET.
    let cases = [
        ("get", "/repos/acme/web/issues"),
        ("Get", "/repos/acme/web/issues"),
        ("gET", "/repos/acme/web/issues"),
        ("post", "/echo"),
        ("Post", "/echo"),
        ("TRACE", "/echo"),
        ("TRACK", "/echo"),
        ("trace", "/echo"),
        ("DEBUG", "/echo"),
        ("PUT", "/echo"),
        ("PATCH", "/echo"),
        ("DELETE", "/echo"),
        ("OPTIONS", "/echo"),
        ("PROPFIND", "/echo"),
        ("GETS", "/echo"),
    ];
    for (method, path) in cases {
        let resp = kw.raw(&plain_get(&f, method, path, &task, "")).await;
        let (_, rec) = kw.assert_denied_raw(&resp, 403, "method_not_allowed").await;
        assert_eq!(rec["method"], method, "{rec}");
        assert_eq!(rec["capability"], "plain.issues.read", "{rec}");
    }
    // HEAD is not GET either (its denial has no body: the header and the record say why).
    let resp = kw
        .raw(&plain_get(&f, "HEAD", "/repos/acme/web/issues", &task, ""))
        .await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert_eq!(
        resp.header("x-keyward-reason").as_deref(),
        Some("method_not_allowed")
    );
    let rec = kw.audit_where("HEAD", |r| r["method"] == "HEAD").await;
    crate::common::assert_record(&rec);
    assert_eq!(rec["reason"], "method_not_allowed", "{rec}");
    assert_eq!(f.plain.hits(), 0);
    // Inside a tunnel, too.
    let task = kw.mint("bot", json!(["secure.read"])).await;
    for method in ["get", "TRACE", "TRACK"] {
        let resp = in_tunnel(&f, &task, &tunnel_get(&f, method, "/echo", "")).await;
        kw.assert_denied_raw(&resp, 403, "method_not_allowed").await;
    }
    assert_eq!(f.tls.hits(), 0);
    // `connect` is not `CONNECT`: no tunnel, and an authority-form target is not a request.
    let (mut tcp, resp) = crate::common::exchange_head(
        kw.proxy_addr,
        format!(
            "connect secure.test:{p} HTTP/1.1\r\nHost: secure.test:{p}\r\nProxy-Authorization: {}\r\n\r\n",
            Harness::proxy_auth(&task),
            p = f.tls.port()
        )
        .as_bytes(),
    )
    .await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 400, "{}", resp.text());
    kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
    let tls = tls_over(&mut tcp, "secure.test", &kw.ca_pem(), &[b"http/1.1"]).await;
    assert!(tls.is_err(), "a tunnel after `connect`");
    assert_eq!(
        kw.metric("keyward_tls_leaf_certs_issued_total").await,
        Some(1.0),
        "only the tunnels above issued a leaf"
    );
    kw.assert_no_leaks().await;
}

/// Method-override headers in every spelling a server might honour.
fn override_headers() -> Vec<String> {
    let mut v = Vec::new();
    for name in [
        "X-HTTP-Method-Override",
        "X-Method-Override",
        "X-HTTP-Method",
        "x-http-method-override",
        "X-HTTP-METHOD-OVERRIDE",
        "X_HTTP_Method_Override",
        "X_Method_Override",
        "X_HTTP_Method",
        "x-http_method-override",
        "X-Original-Method",
        "X-Forwarded-Method",
    ] {
        for value in ["DELETE", "GET", "delete", ""] {
            v.push(format!("{name}: {value}\r\n"));
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_override_query_parameters_are_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    for query in [
        "?_method=DELETE",
        "?x=1&_method=delete",
        "?_METHOD=PUT",
        "?%5Fmethod=DELETE",
        "?x=1;_method=DELETE",
        // What PHP turns into `$_GET['_method']`.
        "?.method=DELETE",
        "?+_method=DELETE",
        "?[method=DELETE",
    ] {
        let path = format!("/echo{query}");
        let resp = kw.raw(&plain_get(&f, "POST", &path, &task, "")).await;
        assert_ambiguous(kw, &resp, "method_override", &path).await;
    }
    assert_eq!(f.plain.hits(), 0);
    // A parameter that only looks alike is an ordinary parameter.
    let resp = kw
        .raw(&plain_get(&f, "POST", "/echo?my_method=1", &task, ""))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    kw.saw(&resp.text());
    assert_eq!(f.plain.hits(), 1);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_override_headers_are_refused_in_every_spelling() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    for header in override_headers() {
        for (method, path) in [("GET", "/repos/acme/web/issues"), ("POST", "/echo")] {
            let resp = kw.raw(&plain_get(&f, method, path, &task, &header)).await;
            assert_ambiguous(
                kw,
                &resp,
                "method_override",
                &format!("{method} with {header:?}"),
            )
            .await;
        }
    }
    assert_eq!(f.plain.hits(), 0);
    let task = kw.mint("bot", json!(["secure.read"])).await;
    for header in override_headers().into_iter().step_by(4) {
        let resp = in_tunnel(&f, &task, &tunnel_get(&f, "POST", "/echo", &header)).await;
        assert_ambiguous(kw, &resp, "method_override", &header).await;
    }
    // And on an HTTP/2 stream.
    let authority = format!("secure.test:{}", f.tls.port());
    let (tcp, head) =
        connect_raw(kw.proxy_addr, &authority, Some(&Harness::proxy_auth(&task))).await;
    assert_eq!(head.status, 200);
    let tls = tls_over(tcp, "secure.test", &kw.ca_pem(), &[b"h2"])
        .await
        .unwrap();
    let mut h2 = h2_over(tls).await;
    for name in [
        "x-http-method-override",
        "x-method-override",
        "x-http-method",
        "x_http_method_override",
    ] {
        let req = http::Request::builder()
            .method("POST")
            .version(http::Version::HTTP_2)
            .uri(format!("https://{authority}/echo"))
            .header(name, "DELETE")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = h2_send(&mut h2, req).await;
        kw.saw(&resp.text());
        assert_ambiguous(kw, &resp, "method_override", name).await;
    }
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

/// Headers that make a server or the gateway in front of it route by another path
/// (Symfony and Zend's `X-Original-URL`, IIS URL Rewrite, Envoy) or another host
/// (`X-Forwarded-Host`, `Forwarded: host=`) than the ones decided on are refused, in every
/// spelling, on the plain listener and in a tunnel; never forwarded with the credential. A
/// `Forwarded` that only says who forwarded (`for=`) is not refused. Nor are `Content_Length`
/// and `Transfer_Encoding`, framing to a server that reads `_` as `-`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_and_host_override_headers_are_refused_in_every_spelling() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let cases = [
        ("X-Original-URL: /admin", "path_override"),
        ("x-rewrite-url: /admin", "path_override"),
        ("X-Original-URI: /admin", "path_override"),
        ("X-Override-URL: /admin", "path_override"),
        ("X-Forwarded-Uri: /admin", "path_override"),
        ("X-Forwarded-Path: /admin", "path_override"),
        ("X-Forwarded-Prefix: /admin", "path_override"),
        ("X-Envoy-Original-Path: /admin", "path_override"),
        ("X_Original_URL: /admin", "path_override"),
        ("X-Forwarded-Host: other.test", "host_override"),
        ("x_forwarded_host: other.test", "host_override"),
        ("X-Host: other.test", "host_override"),
        ("X-Forwarded-Server: other.test", "host_override"),
        ("X-Original-Host: other.test", "host_override"),
        ("X-Original-Forwarded-Host: other.test", "host_override"),
        ("Forwarded: host=other.test", "host_override"),
        (
            "Forwarded: for=192.0.2.1;proto=https;Host=\"other.test\"",
            "host_override",
        ),
        // Framing to a server that reads `_` as `-`: the body read two ways.
        ("Transfer_Encoding: chunked", "framing_lookalike"),
        ("content_length: 40", "framing_lookalike"),
        ("Content_length: 0", "framing_lookalike"),
        ("Content.Length: 0", "framing_lookalike"),
        // What keyward removes from a credentialed upgrade, in a spelling it would not.
        (
            "Sec_WebSocket_Extensions: permessage-deflate",
            "header_lookalike",
        ),
    ];
    for (header, code) in cases {
        let resp = kw
            .raw(&plain_get(
                &f,
                "GET",
                "/repos/acme/web/issues",
                &task,
                &format!("{header}\r\n"),
            ))
            .await;
        assert_ambiguous(kw, &resp, code, header).await;
    }
    assert_eq!(f.plain.hits(), 0);
    let resp = kw
        .raw(&plain_get(
            &f,
            "GET",
            "/repos/acme/web/issues",
            &task,
            "Forwarded: for=192.0.2.1;proto=http\r\n",
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let task = kw.mint("bot", json!(["secure.read"])).await;
    for (header, code) in [
        ("X-Original-URL: /admin", "path_override"),
        ("X-Forwarded-Host: other.test", "host_override"),
        ("Transfer_Encoding: chunked", "framing_lookalike"),
    ] {
        let resp = in_tunnel(
            &f,
            &task,
            &tunnel_get(
                &f,
                "GET",
                "/repos/acme/web/issues",
                &format!("{header}\r\n"),
            ),
        )
        .await;
        assert_ambiguous(kw, &resp, code, &format!("{header} in a tunnel")).await;
    }
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}
