//! Destinations: internal addresses in every spelling as absolute URIs, Host headers and CONNECT
//! targets; service and passthrough hosts that resolve to a blocked address; no DNS for a denied
//! request; redirects never followed (and the credential never goes to the redirect target).
//!
//! DNS rebinding (a second lookup between check and dial) cannot be staged on loopback without a
//! resolver the test controls; `upstream::connect` resolves once and dials exactly the addresses
//! it checked, and the mixed-answer rule is unit-tested there.

use serde_json::json;

use crate::common::{
    connect_raw, http_response, plain_fixture_at, Fixture, Harness, Reply, ScriptUpstream,
};
use crate::headers::{allowed_record, get, raw_req_at, tunnel_h1};

/// Loopback, private, link-local, CGNAT, metadata and unspecified addresses, spelled every way
/// a URL parser somewhere might accept.
const INTERNAL: [&str; 24] = [
    "127.0.0.1",
    "2130706433",
    "0177.0.0.1",
    "0x7f.0.0.1",
    "0x7f000001",
    "017700000001",
    "127.1",
    "127.0.1",
    "[::1]",
    "[0:0:0:0:0:0:0:1]",
    "[::ffff:127.0.0.1]",
    "[::ffff:7f00:1]",
    "[::127.0.0.1]",
    "169.254.169.254",
    "[::ffff:169.254.169.254]",
    "[fd00:ec2::254]",
    "[fe80::1%25eth0]",
    "100.64.0.1",
    "100.127.255.254",
    "10.0.0.1",
    "172.16.0.1",
    "192.168.0.1",
    "0.0.0.0",
    "0",
];

/// A denial is one of the two a name-first decision gives an internal address: not a service
/// (`unknown_host`) or not a name at all (`ambiguous_request`).
fn expected_denial(status: u16, reason: Option<&str>) -> bool {
    matches!(
        (status, reason),
        (403, Some("unknown_host")) | (400, Some("ambiguous_request"))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_addresses_in_every_spelling_are_refused_as_absolute_uris() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    for host in INTERNAL {
        // The plain upstream listens on 127.0.0.1:port: a dial of any loopback spelling hits it.
        let req = format!(
            "GET http://{host}:{port}/echo HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            Harness::proxy_auth(&task)
        );
        let resp = kw.raw(&req).await;
        let reason = resp.header("x-keyward-reason");
        assert!(
            expected_denial(resp.status, reason.as_deref()),
            "{host}: {}",
            resp.text()
        );
        kw.assert_denied_raw(&resp, resp.status, reason.as_deref().unwrap())
            .await;
    }
    assert_eq!(f.plain.hits(), 0, "an internal address was dialled");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_addresses_in_every_spelling_are_refused_as_connect_targets() {
    let f = Fixture::start_with(|p| p.replace("passthrough: [127.0.0.1]", "passthrough: []")).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let auth = Harness::proxy_auth(&task);
    for host in INTERNAL {
        for port in [f.tls.port(), f.tcp.addr.port(), 80, 443] {
            let (_tcp, resp) =
                connect_raw(kw.proxy_addr, &format!("{host}:{port}"), Some(&auth)).await;
            kw.saw(&resp.text());
            let reason = resp.header("x-keyward-reason");
            assert!(
                expected_denial(resp.status, reason.as_deref()),
                "CONNECT {host}:{port}: {}",
                resp.text()
            );
            kw.assert_denied_raw(&resp, resp.status, reason.as_deref().unwrap())
                .await;
        }
    }
    assert_eq!(f.tls.hits(), 0);
    assert_eq!(
        kw.metric("keyward_tls_leaf_certs_issued_total").await,
        Some(0.0),
        "a denied CONNECT issued a leaf"
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn internal_address_in_the_host_header_is_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let auth = Harness::proxy_auth(&task);
    for host in ["169.254.169.254", "127.0.0.1", "[::1]", "2130706433"] {
        // Absolute URI to the service, Host naming the internal address.
        let req = format!(
            "GET http://plain.test:{port}/echo HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        );
        let resp = kw.raw(&req).await;
        kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
        // Origin form: the only destination would be the Host header.
        let req = format!(
            "GET /latest/meta-data/ HTTP/1.1\r\nHost: {host}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        );
        let resp = kw.raw(&req).await;
        assert_eq!(resp.status, 400, "{host}: {}", resp.text());
    }
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_host_resolving_to_loopback_is_blocked_inside_a_tunnel_and_in_every_spelling() {
    let f = Fixture::start_with(|p| {
        let port = p
            .split("  secure:\n    hosts: [secure.test]\n    port: ")
            .nth(1)
            .and_then(|r| r.lines().next())
            .unwrap()
            .to_string();
        p.replace(
            "capabilities:\n",
            &format!(
                "  localtls:\n    hosts: [localhost]\n    port: {port}\n    tls: {{ ca_file: upstream-ca.pem }}\n    inject: {{ header: x-api-key, value: \"${{credential}}\", credential: tls_token }}\n\ncapabilities:\n  localtls.read:\n    service: localtls\n    routes: [GET /echo]\n"
            ),
        )
        .replace("capabilities: [plain.issues.read, ", "capabilities: [localtls.read, plain.issues.read, ")
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["localtls.read", "local.ping"])).await;
    // Decided by name first: the CONNECT is intercepted, the request inside is blocked.
    let mut conn = tunnel_h1(&f, &task, "localhost").await;
    let host = format!("localhost:{}", f.tls.port());
    let resp = crate::common::h1_send(&mut conn, get("/echo", &host)).await;
    kw.saw(&resp.text());
    let (_, rec) = kw.assert_denied_raw(&resp, 403, "blocked_address").await;
    assert_eq!(rec["host"], "localhost");
    assert_eq!(rec["service"], "localtls");
    assert_eq!(f.tls.hits(), 0, "the loopback TLS upstream was reached");
    // The plain `localhost` service, spelled with a trailing dot and in capitals.
    let port = f.plain.port();
    for spelled in ["localhost.", "LOCALHOST", "LocalHost."] {
        let resp = kw
            .raw(&raw_req_at(port, "GET", spelled, "/ping", &task, ""))
            .await;
        let (_, rec) = kw.assert_denied_raw(&resp, 403, "blocked_address").await;
        assert_eq!(rec["host"], "localhost");
    }
    assert_eq!(f.plain.hits(), 0);
    let (_, t) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(
        t["requests_used"], 0,
        "blocked requests are not charged: {t}"
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_host_resolving_to_loopback_is_blocked() {
    let f = Fixture::start_with(|p| {
        p.replace("passthrough: [127.0.0.1]", "passthrough: [localhost]")
            .replace("hosts: [localhost]", "hosts: [local.invalid]")
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let (_tcp, resp) = connect_raw(
        kw.proxy_addr,
        &format!("localhost:{}", f.tcp.addr.port()),
        Some(&Harness::proxy_auth(&task)),
    )
    .await;
    kw.saw(&resp.text());
    let (_, rec) = kw.assert_denied_raw(&resp, 403, "blocked_address").await;
    assert_eq!(rec["host"], "localhost");
    assert_eq!(rec["method"], "CONNECT");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_request_to_an_unresolvable_service_host_makes_no_dns_lookup() {
    let f = Fixture::start_with(|p| {
        p.replace(
            "capabilities:\n",
            "  nodns:\n    hosts: [nodns.invalid]\n    scheme: http\n    allow_cleartext: true\n    inject: { header: Authorization, value: \"Bearer ${credential}\", credential: api_token }\n\ncapabilities:\n  nodns.read:\n    service: nodns\n    routes: [GET /ok]\n",
        )
        .replace("capabilities: [plain.issues.read, ", "capabilities: [nodns.read, plain.issues.read, ")
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["nodns.read"])).await;
    let auth = Harness::proxy_auth(&task);
    let req = |method: &str, path: &str| {
        format!(
            "{method} http://nodns.invalid{path} HTTP/1.1\r\nHost: nodns.invalid\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        )
    };
    let dns_errors = "keyward_upstream_errors_total{kind=\"dns\",service=\"nodns\"}";
    // Denied by name, method and path: answered without a lookup (a lookup would fail: 502).
    let resp = kw.raw(&req("POST", "/ok")).await;
    kw.assert_denied_raw(&resp, 403, "method_not_allowed").await;
    let resp = kw.raw(&req("GET", "/other")).await;
    kw.assert_denied_raw(&resp, 403, "route_not_in_intent")
        .await;
    let resp = kw.raw(&req("GET", "/ok/../ok")).await;
    kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
    assert_eq!(kw.metric(dns_errors).await.unwrap_or(0.0), 0.0);
    // Only the allowed request looks the name up (and fails: the name does not exist).
    let resp = kw.raw(&req("GET", "/ok")).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    let metrics = kw.metrics().await;
    let dns = metrics
        .lines()
        .find(|l| {
            l.starts_with("keyward_upstream_errors_total{")
                && l.contains("service=\"nodns\"")
                && l.contains("kind=\"dns\"")
        })
        .unwrap_or_else(|| panic!("no upstream error for nodns: {metrics}"));
    assert!(dns.ends_with(" 1"), "{dns}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirects_are_returned_to_the_agent_and_never_followed() {
    let trap =
        ScriptUpstream::start(|_| Reply::bytes(http_response("200 OK", &[], b"trapped"))).await;
    let trap_port = trap.port();
    let script = ScriptUpstream::start(move |req| {
        let (status, to) = if req.request_line().starts_with("POST") {
            (
                "307 Temporary Redirect",
                format!("http://127.0.0.1:{trap_port}/steal"),
            )
        } else if req.request_line().contains("same") {
            ("302 Found", "/admin/x".to_string())
        } else {
            ("302 Found", format!("http://evil.test:{trap_port}/steal"))
        };
        Reply::bytes(http_response(status, &[&format!("Location: {to}")], b""))
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;

    let resp = kw
        .raw(&raw_req_at(port, "GET", "plain.test", "/echo", &task, ""))
        .await;
    assert_eq!(resp.status, 302);
    assert_eq!(
        resp.header("location"),
        Some(format!("http://evil.test:{trap_port}/steal"))
    );
    let rec = allowed_record(kw, &task, "/echo").await;
    assert_eq!(rec["status"], 302);

    let resp = kw
        .raw(
            &raw_req_at(
                port,
                "POST",
                "plain.test",
                "/echo",
                &task,
                "Content-Length: 4\r\n",
            )
            .replace("\r\n\r\n", "\r\n\r\nbody"),
        )
        .await;
    assert_eq!(resp.status, 307);
    assert_eq!(
        resp.header("location"),
        Some(format!("http://127.0.0.1:{trap_port}/steal"))
    );
    let resp = kw
        .raw(&raw_req_at(
            port,
            "GET",
            "plain.test",
            "/echo?same",
            &task,
            "",
        ))
        .await;
    assert_eq!(resp.status, 302);
    assert_eq!(resp.header("location").as_deref(), Some("/admin/x"));

    assert_eq!(trap.hits(), 0, "keyward followed a redirect");
    assert_eq!(script.hits(), 3);
    assert!(script
        .seen()
        .iter()
        .all(|s| !s.request_line().contains("/admin")));
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_scheme_toward_an_https_service_never_sends_the_credential_in_the_clear() {
    // A plain listener where the TLS service points: cleartext would be recorded here.
    let script =
        ScriptUpstream::start(|_| Reply::bytes(http_response("200 OK", &[], b"clear"))).await;
    let port = script.port();
    let f = Fixture::start_with(|p| crate::common::tls_services_at(p, port)).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let resp = kw
        .raw(&raw_req_at(port, "GET", "secure.test", "/echo", &task, ""))
        .await;
    assert_ne!(resp.status, 200, "{}", resp.text());
    assert!(!String::from_utf8_lossy(&resp.body).contains("clear"));
    for s in script.seen() {
        assert!(
            s.header("x-api-key").is_none() && !s.head.contains(&f.creds.tls_token),
            "the credential crossed in the clear: {}",
            s.head
        );
    }
    // Whatever the answer, it is recorded once.
    let problem: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let rec = kw.audit_for(problem["request_id"].as_str().unwrap()).await;
    crate::common::assert_record(&rec);
    kw.assert_no_leaks().await;
}
