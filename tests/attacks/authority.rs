//! Authority binding: the destination is the absolute URI's authority (plain HTTP) or the
//! CONNECT authority, spelled one way only. `Host` must agree, userinfo is refused, odd ports
//! and odd host spellings are refused or match nothing, an IP-literal service is not reached by
//! another spelling of its address, and a wildcard host matches exactly one label.

use serde_json::json;

use crate::common::{
    connect_raw, exchange_head, extend_policy, tls_over, Fixture, Harness, RawResp, Task,
};

const LEAVES: &str = "keyward_tls_leaf_certs_issued_total";

fn auth(task: &Task) -> String {
    Harness::proxy_auth(task)
}

/// `GET {target}` with `Host: {host}` (none when empty) and the task's credentials.
fn get(target: &str, host: &str, task: &Task) -> String {
    let host = if host.is_empty() {
        String::new()
    } else {
        format!("Host: {host}\r\n")
    };
    format!(
        "GET {target} HTTP/1.1\r\n{host}Proxy-Authorization: {}\r\nConnection: close\r\n\r\n",
        auth(task)
    )
}

/// A refusal of a request target keyward cannot read one way: 400 `ambiguous_request` with its
/// record. A target hyper cannot parse at all is answered 400 by hyper before keyward sees it;
/// that still leaves one record (`outcome: unparsed`), counted in `unparsed` (the test's
/// running count of them).
async fn assert_unreadable(kw: &Harness, resp: &RawResp, what: &str, unparsed: &mut usize) {
    assert_eq!(resp.status, 400, "{what}: {}", resp.text());
    if resp.header("x-keyward-reason").is_some() {
        kw.assert_denied_raw(resp, 400, "ambiguous_request").await;
    } else {
        assert!(resp.body.is_empty(), "{what}: {}", resp.text());
        *unparsed += 1;
        let recs = kw
            .audit_count(*unparsed, |r| r["outcome"] == "unparsed")
            .await;
        assert_eq!(
            recs.len(),
            *unparsed,
            "{what}: one record per unparsable request"
        );
        let rec = recs.last().unwrap();
        crate::common::assert_record(rec);
        assert_eq!(rec["reason"], "ambiguous_request", "{what}: {rec}");
        assert_eq!(rec["status"], 400, "{what}: {rec}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_header_that_disagrees_with_the_absolute_uri_is_ambiguous() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let mut unparsed = 0;
    let task = kw
        .mint("bot", json!(["plain.issues.read", "query.search"]))
        .await;
    let port = f.plain.port();
    let target = format!("http://plain.test:{port}/echo");
    let hosts = [
        format!("plain.test:{}", port + 1),
        "plain.test".to_string(), // default port 80, not the URI's
        format!("query.test:{port}"),
        format!("evil.test:{port}"),
        format!("plain.test.evil.test:{port}"),
        format!("x@plain.test:{port}"),
        format!("plain.test:{port}@evil.test"),
        format!("plain.test:0{port}"),
        format!("plain.test:{port}/x"),
        format!("plain.test:{port}, evil.test"),
        format!("plain..test:{port}"),
        format!("127.0.0.1:{port}"),
    ];
    for host in &hosts {
        let resp = kw.raw(&get(&target, host, &task)).await;
        assert_unreadable(kw, &resp, host, &mut unparsed).await;
    }
    // Two Host headers, even equal ones.
    let resp = kw
        .raw(&format!(
            "GET {target} HTTP/1.1\r\nHost: plain.test:{port}\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            auth(&task)
        ))
        .await;
    let (problem, _) = kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
    assert!(
        problem["detail"]
            .as_str()
            .unwrap()
            .contains("duplicate_host"),
        "{problem}"
    );
    assert_eq!(f.plain.hits(), 0);
    // Case and one trailing dot are the same host; the upstream gets keyward's spelling.
    for host in [
        format!("PLAIN.TEST:{port}"),
        format!("plain.test.:{port}"),
        String::new(),
    ] {
        let resp = kw.raw(&get(&target, &host, &task)).await;
        assert_eq!(resp.status, 200, "Host {host:?}: {}", resp.text());
        assert_eq!(
            f.plain.last().header_all("host"),
            vec![format!("plain.test:{port}")],
            "Host {host:?}"
        );
    }
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn userinfo_in_the_absolute_uri_is_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let mut unparsed = 0;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    for target in [
        format!("http://good@plain.test:{port}/echo"),
        format!("http://plain.test:{port}@evil.test:{port}/echo"),
        format!("http://evil.test@plain.test:{port}/echo"),
        format!("http://@plain.test:{port}/echo"),
        format!("http://user:pass@plain.test:{port}/echo"),
        format!("http://plain.test%40evil.test:{port}/echo"),
    ] {
        let resp = kw
            .raw(&get(&target, &format!("plain.test:{port}"), &task))
            .await;
        assert_unreadable(kw, &resp, &target, &mut unparsed).await;
    }
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_ports_and_host_spellings_in_the_absolute_uri_are_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let mut unparsed = 0;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    for authority in [
        format!("plain.test:0{port}"),
        format!("plain.test:+{port}"),
        "plain.test:99999".to_string(),
        "plain.test:0".to_string(),
        "plain.test:".to_string(),
        format!("plain.test:{port}:{port}"),
        format!("plain..test:{port}"),
        format!(".plain.test:{port}"),
        format!("plain.test..:{port}"),
        format!("pla_in\\.test:{port}"),
        format!("[plain.test]:{port}"),
    ] {
        let target = format!("http://{authority}/echo");
        let resp = kw.raw(&get(&target, "", &task)).await;
        assert_unreadable(kw, &resp, &target, &mut unparsed).await;
    }
    assert_eq!(f.plain.hits(), 0);
    // No port: the scheme's default, which is not the service's port.
    let resp = kw.raw(&get("http://plain.test/echo", "", &task)).await;
    kw.assert_denied_raw(&resp, 403, "unknown_host").await;
    // Schemes other than http and https are not proxied.
    for target in [
        format!("ftp://plain.test:{port}/echo"),
        format!("ws://plain.test:{port}/echo"),
        format!("file://plain.test:{port}/echo"),
    ] {
        let resp = kw.raw(&get(&target, "", &task)).await;
        assert_unreadable(kw, &resp, &target, &mut unparsed).await;
    }
    // `host:port` with another method than CONNECT (`connect` is one): no absolute URI, and
    // said so, not called a scheme.
    let resp = kw
        .raw(&format!(
            "connect plain.test:{port} HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            crate::common::Harness::proxy_auth(&task)
        ))
        .await;
    let (_, rec) = kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
    assert_eq!(rec["detail"], "not_absolute_form", "{rec}");
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cleartext_request_to_an_https_service_host_is_unknown_and_never_sent() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let port = f.tls.port();
    // The service is https: an http:// target names no service, so no credential goes out
    // in the clear, even to the service's own address.
    let resp = kw
        .raw(&get(&format!("http://secure.test:{port}/echo"), "", &task))
        .await;
    let (_, rec) = kw.assert_denied_raw(&resp, 403, "unknown_host").await;
    assert_eq!(rec["scheme"], "http", "{rec}");
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

/// The standard policy plus a service on an IP literal and one on a wildcard host, both served
/// by the plain upstream.
fn with_ip_and_wildcard_services(p: String, plain: u16) -> String {
    let services = format!(
        r#"  iplit:
    hosts: [127.0.0.2]
    scheme: http
    port: {plain}
    connect_to: 127.0.0.1:{plain}
    allow_cleartext: true
    inject: {{ header: Authorization, value: "Bearer ${{credential}}", credential: api_token }}
  wild:
    hosts: ["*.wild.test"]
    scheme: http
    port: {plain}
    connect_to: 127.0.0.1:{plain}
    allow_cleartext: true
    inject: {{ header: Authorization, value: "Bearer ${{credential}}", credential: api_token }}
"#
    );
    let capabilities = r#"  iplit.ping:
    service: iplit
    risk: low
    routes: [GET /ping]
  wild.ping:
    service: wild
    risk: low
    routes: [GET /ping]
"#;
    let agents = r#"  hostbot:
    owner: tests
    capabilities: [iplit.ping, wild.ping, plain.issues.read]
    max_ttl: 1h
"#;
    extend_policy(&p, &services, capabilities, agents)
}

async fn fixture_with_ip_and_wildcard() -> Fixture {
    // The plain upstream's port is only known inside the fixture; it is the port of `plain.test`.
    Fixture::start_with(|p| {
        let plain: u16 = p
            .split("plain.test]\n    scheme: http\n    port: ")
            .nth(1)
            .and_then(|rest| rest.split('\n').next())
            .and_then(|n| n.parse().ok())
            .expect("the standard policy names the plain port");
        with_ip_and_wildcard_services(p, plain).replace(
            "passthrough: [127.0.0.1]",
            "passthrough: [127.0.0.1, \"*.pass.test\"]",
        )
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ip_literal_service_is_not_reached_by_another_spelling_of_its_address() {
    let f = fixture_with_ip_and_wildcard().await;
    let kw = &f.kw;
    let task = kw.mint("hostbot", json!(["iplit.ping"])).await;
    let port = f.plain.port();
    let ok = kw
        .raw(&get(&format!("http://127.0.0.2:{port}/ping"), "", &task))
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(f.plain.hits(), 1);
    for host in [
        "2130706434",
        "0x7f000002",
        "0x7f.0.0.2",
        "0177.0.0.2",
        "127.0.0.02",
        "127.2",
        "127.0.2",
        "[::ffff:127.0.0.2]",
        "[::127.0.0.2]",
        "[::ffff:7f00:2]",
        "127.0.0.2.nip.io",
    ] {
        let target = format!("http://{host}:{port}/ping");
        let resp = kw.raw(&get(&target, "", &task)).await;
        assert!(
            resp.status == 403 || resp.status == 400,
            "{target}: {}",
            resp.text()
        );
        let reason = resp.header("x-keyward-reason");
        assert!(
            matches!(
                reason.as_deref(),
                Some("unknown_host") | Some("ambiguous_request")
            ),
            "{target}: {}",
            resp.text()
        );
        kw.assert_denied_raw(&resp, resp.status, reason.as_deref().unwrap())
            .await;
    }
    // And the hostname services are not reached by their address either.
    let other = kw.mint("hostbot", json!(["plain.issues.read"])).await;
    let resp = kw
        .raw(&get(
            &format!("http://127.0.0.1:{port}/repos/a/b/issues"),
            "",
            &other,
        ))
        .await;
    kw.assert_denied_raw(&resp, 403, "unknown_host").await;
    assert_eq!(f.plain.hits(), 1);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_service_and_passthrough_hosts_match_exactly_one_label() {
    let f = fixture_with_ip_and_wildcard().await;
    let kw = &f.kw;
    let mut unparsed = 0;
    let task = kw.mint("hostbot", json!(["wild.ping"])).await;
    let port = f.plain.port();
    for (seq, host) in (1u64..).zip([
        "a.wild.test",
        "A.WILD.TEST",
        "a-b.wild.test",
        "a.wild.test.",
    ]) {
        let resp = kw
            .raw(&get(&format!("http://{host}:{port}/ping"), "", &task))
            .await;
        assert_eq!(resp.status, 200, "{host}: {}", resp.text());
        let rec = kw
            .audit_where(host, |r| {
                r["reason"] == "allowed" && r["seq"].as_u64() == Some(seq)
            })
            .await;
        assert_eq!(rec["service"], "wild", "{rec}");
        assert_eq!(
            rec["host"],
            host.to_ascii_lowercase().trim_end_matches('.'),
            "{rec}"
        );
    }
    assert_eq!(f.plain.hits(), 4);
    for host in [
        "wild.test",
        "a.b.wild.test",
        "wild.test.evil.test",
        "a.wild.test.evil.test",
        "awild.test",
        "a-wild.test",
        "evil.test",
    ] {
        let target = format!("http://{host}:{port}/ping");
        let resp = kw.raw(&get(&target, "", &task)).await;
        kw.assert_denied_raw(&resp, 403, "unknown_host").await;
    }
    // (A label that begins or ends with `-` is no host name: no certificate can name it.)
    for host in [
        "*.wild.test",
        ".wild.test",
        "a..wild.test",
        "a.wild.test..",
        "-a.wild.test",
        "a-.wild.test",
    ] {
        let target = format!("http://{host}:{port}/ping");
        let resp = kw.raw(&get(&target, "", &task)).await;
        assert_unreadable(kw, &resp, &target, &mut unparsed).await;
    }
    assert_eq!(f.plain.hits(), 4);
    // A wildcard passthrough host matches one label too: deeper names are unknown, refused
    // before any lookup or dial.
    for authority in [
        "a.b.pass.test:443",
        "pass.test:443",
        "xpass.test:443",
        "a.pass.test.evil.test:443",
    ] {
        let (_, head) = connect(kw, authority, &task).await;
        let (_, rec) = kw.assert_denied_raw(&head, 403, "unknown_host").await;
        assert_eq!(rec["method"], "CONNECT", "{rec}");
    }
    // A passthrough host asked in absolute form is refused, and told how it is reached.
    let resp = kw
        .raw(&get(&format!("http://a.pass.test:{port}/x"), "", &task))
        .await;
    let (problem, rec) = kw.assert_denied_raw(&resp, 403, "unknown_host").await;
    assert_eq!(rec["detail"], "passthrough_only", "{rec}");
    let detail = problem["detail"].as_str().unwrap();
    assert!(detail.contains("only through CONNECT"), "{problem}");
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    kw.assert_no_leaks().await;
}

/// `CONNECT {authority}` with the task's credentials, `Host` equal to the authority.
async fn connect(kw: &Harness, authority: &str, task: &Task) -> (tokio::net::TcpStream, RawResp) {
    let (tcp, head) = exchange_head(
        kw.proxy_addr,
        format!(
            "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {}\r\n\r\n",
            auth(task)
        )
        .as_bytes(),
    )
    .await;
    kw.saw(&head.text());
    (tcp, head)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_connect_authorities_are_refused_without_a_leaf() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let mut unparsed = 0;
    let task = kw
        .mint("bot", json!(["secure.read", "plain.issues.read"]))
        .await;
    let p = f.tls.port();
    for authority in [
        format!("secure.test:{p}@evil.test:{p}"),
        format!("evil.test:{p}@secure.test:{p}"),
        format!("user@secure.test:{p}"),
        "secure.test".to_string(),
        "secure.test:".to_string(),
        format!("secure.test:+{p}"),
        format!("secure.test:0{p}"),
        "secure.test:99999".to_string(),
        "secure.test:0".to_string(),
        format!("secure.test:{p}:{p}"),
        format!("secure..test:{p}"),
        format!(".secure.test:{p}"),
        // Labels no certificate can name: refused before the 200, not by a failed handshake.
        format!("-secure.test:{p}"),
        format!("secure-.test:{p}"),
        "[::1]".to_string(),
        format!("[::1:{p}"),
        format!("[secure.test]:{p}"),
        format!(":{p}"),
        format!("secure.test:{p}/path"),
        format!("http://secure.test:{p}/"),
    ] {
        let (_, head) = connect(kw, &authority, &task).await;
        assert_unreadable(kw, &head, &format!("CONNECT {authority}"), &mut unparsed).await;
        if head.header("x-keyward-reason").is_some() {
            let rec = kw
                .audit_where(&authority, |r| {
                    r["request_id"]
                        == serde_json::from_slice::<serde_json::Value>(&head.body).unwrap()
                            ["request_id"]
                })
                .await;
            assert_eq!(rec["method"], "CONNECT", "{rec}");
        }
    }
    // A CONNECT without a port is refused; its record names the host and guesses no port.
    let (_, head) = connect(kw, "secure.test", &task).await;
    let (_, rec) = kw.assert_denied_raw(&head, 400, "ambiguous_request").await;
    assert_eq!(
        (&rec["host"], &rec["port"]),
        (&json!("secure.test"), &json!(null)),
        "{rec}"
    );
    // IP literals that are not a passthrough host in exactly that spelling are unknown.
    for authority in [
        format!("[::1]:{p}"),
        format!("[::ffff:127.0.0.1]:{}", f.tcp.addr.port()),
        format!("2130706433:{}", f.tcp.addr.port()),
    ] {
        let (_, head) = connect(kw, &authority, &task).await;
        kw.assert_denied_raw(&head, 403, "unknown_host").await;
    }
    assert_eq!(
        kw.metric(LEAVES).await,
        Some(0.0),
        "a leaf for a refused CONNECT"
    );
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

/// A CONNECT carries no body: one with `Content-Length` or `Transfer-Encoding` is 400
/// `ambiguous_request`, no leaf, and the connection closes. Its `Host` is not the destination
/// (the authority is): a `Host` naming the proxy (Node's `http.request` sends that), another
/// case, or none is intercepted all the same. Another task's CONNECT on a connection a task
/// holds is a 407.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_with_a_body_is_ambiguous_and_its_host_header_does_not_decide() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let p = f.tls.port();
    let head_with = |extra: &str| {
        format!(
            "CONNECT secure.test:{p} HTTP/1.1\r\n{extra}Proxy-Authorization: {}\r\n\r\n",
            auth(&task)
        )
    };
    for (extra, code) in [
        (
            format!("Host: secure.test:{p}\r\nContent-Length: 5\r\n"),
            "connect_with_body",
        ),
        (
            format!("Host: secure.test:{p}\r\nTransfer-Encoding: chunked\r\n"),
            "connect_with_body",
        ),
    ] {
        let (mut tcp, head) = exchange_head(kw.proxy_addr, head_with(&extra).as_bytes()).await;
        kw.saw(&head.text());
        let (problem, _) = kw.assert_denied_raw(&head, 400, "ambiguous_request").await;
        assert!(
            problem["detail"].as_str().unwrap().contains(code),
            "{extra:?}: {problem}"
        );
        let mut rest = Vec::new();
        let _ = crate::common::bounded(
            "closed",
            tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut rest),
        )
        .await;
    }
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    for extra in [
        format!("Host: Secure.Test:{p}\r\n"),
        String::new(),
        "Content-Length: 00\r\n".to_string(),
        format!("Host: {}\r\n", kw.proxy_addr),
        "Host: localhost\r\n".to_string(),
    ] {
        let (_, head) = exchange_head(kw.proxy_addr, head_with(&extra).as_bytes()).await;
        assert_eq!(head.status, 200, "{extra:?}: {}", head.text());
    }
    // Another task on a connection the first holds (after a refused plain request).
    let other = kw
        .mint("bot", json!(["secure.read", "plain.issues.read"]))
        .await;
    let plain = format!(
        "GET http://plain.test:{}/repos/acme/web/nope HTTP/1.1\r\nHost: plain.test:{}\r\nProxy-Authorization: {}\r\n\r\n",
        f.plain.port(),
        f.plain.port(),
        auth(&other)
    );
    let connect = head_with(&format!("Host: secure.test:{p}\r\n"));
    let (mut tcp, first) =
        exchange_head(kw.proxy_addr, format!("{plain}{connect}").as_bytes()).await;
    kw.saw(&first.text());
    kw.assert_denied_raw(&first, 403, "route_not_in_intent")
        .await;
    let second = crate::common::read_head_and_body(&mut tcp).await;
    kw.saw(&second.text());
    let (problem, _) = kw.assert_denied_raw(&second, 407, "invalid_token").await;
    assert!(
        problem["detail"].as_str().unwrap().contains("another task"),
        "{problem}"
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_host_case_and_trailing_dot_name_the_same_host_and_one_leaf() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let p = f.tls.port();
    for authority in [
        format!("SECURE.TEST:{p}"),
        format!("secure.test.:{p}"),
        format!("Secure.Test:{p}"),
    ] {
        let (tcp, head) = connect_raw(kw.proxy_addr, &authority, Some(&auth(&task))).await;
        assert_eq!(head.status, 200, "{authority}: {}", head.text());
        let tls = tls_over(tcp, "secure.test", &kw.ca_pem(), &[b"http/1.1"])
            .await
            .unwrap();
        let mut conn = crate::common::h1_over(tls).await;
        let req = http::Request::builder()
            .uri("/repos/acme/web/issues")
            .header("host", authority.to_ascii_lowercase())
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = crate::common::h1_send(&mut conn, req).await;
        kw.saw(&resp.text());
        assert_eq!(resp.status, 200, "{authority}: {}", resp.text());
    }
    // One host, one leaf: the spelling does not mint certificates for other names.
    assert_eq!(kw.metric(LEAVES).await, Some(1.0));
    assert_eq!(f.tls.hits(), 3);
    let recs = kw
        .audit_count(3, |r| r["reason"] == "allowed" && r["method"] == "GET")
        .await;
    for r in recs {
        assert_eq!(r["host"], "secure.test", "{r}");
    }
    kw.assert_no_leaks().await;
}

/// A wildcard service's hosts each get connections of their own: a request for `b.pair.test`
/// must not ride a connection dialled and verified for `a.pair.test` (whose certificate does
/// not name `b`). Pools were per service, so once `a` had been called, `b` got a 200 over
/// `a`'s connection, its credential included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_never_rides_a_connection_made_for_another_host_of_its_service() {
    let f = Fixture::start_with(|p| {
        let tls: u16 = p
            .split("secure.test]\n    port: ")
            .nth(1)
            .and_then(|rest| rest.split('\n').next())
            .and_then(|n| n.parse().ok())
            .expect("the standard policy names the TLS port");
        let services = format!(
            r#"  pair:
    hosts: ["*.pair.test"]
    port: {tls}
    connect_to: 127.0.0.1:{tls}
    tls: {{ ca_file: upstream-ca.pem }}
    inject: {{ header: x-api-key, value: "${{credential}}", credential: tls_token }}
"#
        );
        let capabilities =
            "  pair.echo:\n    service: pair\n    risk: low\n    routes: [GET /echo]\n";
        let agents =
            "  pairbot:\n    owner: tests\n    capabilities: [pair.echo]\n    max_ttl: 1h\n";
        extend_policy(&p, &services, capabilities, agents)
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("pairbot", json!(["pair.echo"])).await;
    let agent = kw.agent(&task);
    let url = |host: &str| format!("https://{host}:{}/echo", f.tls.port());

    let b_alone = kw.send(agent.get(url("b.pair.test"))).await;
    assert_eq!(b_alone.status, 502, "{}", b_alone.body);
    let a = kw.send(agent.get(url("a.pair.test"))).await;
    assert_eq!(a.status, 200, "{}", a.body);
    // `a`'s connection is pooled now; `b` still gets its own, which fails verification.
    for _ in 0..3 {
        let b = kw.send(agent.get(url("b.pair.test"))).await;
        assert_eq!(b.status, 502, "{}", b.body);
    }
    assert_eq!(
        f.tls.hits(),
        1,
        "only the request for a.pair.test reached the upstream"
    );
    kw.assert_no_leaks().await;
}
