//! Admin and self: the proxy listener is not the admin API (origin-form requests get 400, never
//! admin content), the admin token is checked strictly (missing, wrong, wrong scheme, in the
//! query, duplicated), and keyward never proxies to its own listeners (a `connect_to` or a
//! passthrough host that lands on them is `blocked_address`, with no connection made).

use http::Method;
use serde_json::json;

use crate::common::{basic, connect_raw, extend_policy, raw_exchange, Fixture, Harness, RawResp};

const LEAVES: &str = "keyward_tls_leaf_certs_issued_total";

/// Admin content an agent must never get through the proxy listener: metrics, task listings.
fn assert_no_admin_content(resp: &RawResp, what: &str) {
    let text = String::from_utf8_lossy(&resp.body);
    for needle in [
        "keyward_",
        "\"tasks\"",
        "expires_at",
        "requests_used",
        "\"intent\"",
    ] {
        assert!(
            !text.contains(needle),
            "{what}: admin content served: {text}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn origin_form_requests_on_the_proxy_listener_get_400_never_admin_content() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let admin = format!("Authorization: Bearer {}\r\n", kw.admin_token);
    let targets = [
        ("GET", "/metrics".to_string()),
        ("GET", "/v1/tasks".to_string()),
        ("GET", format!("/v1/tasks/{}", task.id)),
        ("DELETE", format!("/v1/tasks/{}", task.id)),
        ("POST", "/v1/reload".to_string()),
        ("GET", "/healthz".to_string()),
        ("GET", "/readyz".to_string()),
        ("GET", "/".to_string()),
    ];
    let auths = [
        String::new(),
        format!("Proxy-Authorization: {}\r\n", Harness::proxy_auth(&task)),
    ];
    for (method, path) in &targets {
        for auth in &auths {
            let what = format!("{method} {path} (proxy credentials: {})", !auth.is_empty());
            let resp = kw
                .raw(&format!(
                    "{method} {path} HTTP/1.1\r\nHost: {}\r\n{admin}{auth}Content-Length: 0\r\nConnection: close\r\n\r\n",
                    kw.proxy_addr
                ))
                .await;
            assert_no_admin_content(&resp, &what);
            assert_eq!(resp.status, 400, "{what}: {}", resp.text());
            let (problem, rec) = kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
            assert!(
                problem["detail"]
                    .as_str()
                    .unwrap()
                    .contains("not_absolute_form"),
                "{what}: {problem}"
            );
            assert_eq!(rec["method"], *method, "{what}: {rec}");
        }
    }
    // Nothing was revoked or reloaded, and nothing went upstream.
    let (_, t) = kw
        .admin(Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(t["status"], "active", "{t}");
    assert_eq!(
        kw.metric("keyward_policy_reloads_total{result=\"ok\"}")
            .await
            .unwrap_or(0.0),
        0.0
    );
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asterisk_form_on_the_proxy_listener_is_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let resp = kw
        .raw(&format!(
            "OPTIONS * HTTP/1.1\r\nHost: plain.test:{}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
            f.plain.port(),
            Harness::proxy_auth(&task)
        ))
        .await;
    assert_no_admin_content(&resp, "OPTIONS *");
    kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_requests_to_keywards_own_listeners_are_not_proxied() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["plain.issues.read", "local.ping"]))
        .await;
    let port = kw.admin_addr.port();
    let proxy = kw.proxy_addr.port();
    for authority in [
        format!("127.0.0.1:{proxy}"),
        format!("localhost:{proxy}"),
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        format!("[::ffff:127.0.0.1]:{port}"),
        format!("2130706433:{port}"),
    ] {
        for path in ["/metrics", "/v1/tasks"] {
            // An agent that holds the admin token cannot send it anywhere (`secret_egress`);
            // without it, keyward's own listeners are no destination (`unknown_host`).
            for (auth, reason) in [
                (String::new(), "unknown_host"),
                (
                    format!("Authorization: Bearer {}\r\n", kw.admin_token),
                    "secret_egress",
                ),
            ] {
                let resp = kw
                    .raw(&format!(
                        "GET http://{authority}{path} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {}\r\n{auth}Connection: close\r\n\r\n",
                        Harness::proxy_auth(&task),
                    ))
                    .await;
                let what = format!("http://{authority}{path}");
                assert_no_admin_content(&resp, &what);
                kw.assert_denied_raw(&resp, 403, reason).await;
            }
        }
    }
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

/// A raw request to the admin listener; the answer must be 401.
async fn admin_raw(kw: &Harness, head: &str) -> RawResp {
    let resp = raw_exchange(kw.admin_addr, head.as_bytes()).await;
    kw.saw(&resp.text());
    resp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_token_is_accepted_only_once_as_bearer_in_the_authorization_header() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let adm = kw.admin_token.clone();
    let get = |query: &str, lines: &str| {
        format!(
            "GET /v1/tasks{query} HTTP/1.1\r\nHost: localhost\r\n{lines}Connection: close\r\n\r\n"
        )
    };
    let cases = [
        ("no token", get("", "")),
        ("token in the query", get(&format!("?token={adm}"), "")),
        (
            "access_token in the query",
            get(&format!("?access_token={adm}"), ""),
        ),
        (
            "bearer in the query",
            get(&format!("?authorization=Bearer%20{adm}"), ""),
        ),
        ("no scheme", get("", &format!("Authorization: {adm}\r\n"))),
        (
            "Token scheme",
            get("", &format!("Authorization: Token {adm}\r\n")),
        ),
        (
            "Basic with the token as password",
            get("", &format!("Authorization: {}\r\n", basic("admin", &adm))),
        ),
        (
            "Basic with the raw token",
            get("", &format!("Authorization: Basic {adm}\r\n")),
        ),
        (
            "in Proxy-Authorization",
            get("", &format!("Proxy-Authorization: Bearer {adm}\r\n")),
        ),
        (
            "in X-Admin-Token",
            get("", &format!("X-Admin-Token: {adm}\r\n")),
        ),
        ("in a cookie", get("", &format!("Cookie: token={adm}\r\n"))),
        (
            "underscore look-alike header",
            get("", &format!("Authorization_: Bearer {adm}\r\n")),
        ),
        (
            "prefix of the token",
            get(
                "",
                &format!("Authorization: Bearer {}\r\n", &adm[..adm.len() - 1]),
            ),
        ),
        (
            "token with a suffix",
            get("", &format!("Authorization: Bearer {adm}x\r\n")),
        ),
        (
            "token upper-cased",
            get(
                "",
                &format!("Authorization: Bearer {}\r\n", adm.to_uppercase()),
            ),
        ),
        (
            "two tokens in one value",
            get("", &format!("Authorization: Bearer {adm} {adm}\r\n")),
        ),
        (
            "comma-joined",
            get(
                "",
                &format!("Authorization: Bearer {adm}, Bearer {adm}\r\n"),
            ),
        ),
        (
            "the task token",
            get("", &format!("Authorization: Bearer {}\r\n", task.token)),
        ),
        (
            "right then wrong",
            get(
                "",
                &format!("Authorization: Bearer {adm}\r\nAuthorization: Bearer nope\r\n"),
            ),
        ),
        (
            "wrong then right",
            get(
                "",
                &format!("Authorization: Bearer nope\r\nAuthorization: Bearer {adm}\r\n"),
            ),
        ),
        (
            "right twice",
            get(
                "",
                &format!("Authorization: Bearer {adm}\r\nAuthorization: Bearer {adm}\r\n"),
            ),
        ),
    ];
    type Answer = (Vec<(String, String)>, Vec<u8>);
    let mut reference: Option<Answer> = None;
    for (what, head) in cases {
        let resp = admin_raw(kw, &head).await;
        assert_eq!(resp.status, 401, "{what}: {}", resp.text());
        assert!(
            !String::from_utf8_lossy(&resp.body).contains(&task.id),
            "{what}"
        );
        // Every refusal is the same answer: no oracle on how close a guess was.
        let mut headers: Vec<(String, String)> = resp
            .headers
            .iter()
            .filter(|(n, _)| n != "date")
            .cloned()
            .collect();
        headers.sort();
        match &reference {
            None => reference = Some((headers, resp.body.clone())),
            Some((h, b)) => {
                assert_eq!(&headers, h, "{what}");
                assert_eq!(&resp.body, b, "{what}");
            }
        }
    }
    // A refused DELETE revokes nothing, a refused POST mints nothing.
    for head in [
        format!("DELETE /v1/tasks/{} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", task.id),
        format!("DELETE /v1/tasks/{}?token={adm} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n", task.id),
        "POST /v1/tasks HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 47\r\nConnection: close\r\n\r\n{\"agent\":\"bot\",\"intent\":[\"plain.issues.read\"]}".to_string(),
    ] {
        let resp = admin_raw(kw, &head).await;
        assert_eq!(resp.status, 401, "{}", resp.text());
    }
    let (_, list) = kw.admin(Method::GET, "/v1/tasks", None).await;
    let tasks = list["tasks"].as_array().unwrap();
    assert_eq!(tasks.len(), 1, "{list}");
    assert_eq!(tasks[0]["status"], "active", "{list}");
    assert_eq!(f.plain.hits() + f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_paths_spelled_differently_do_not_skip_the_token_check() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    for path in [
        "//v1/tasks".to_string(),
        "/V1/tasks".to_string(),
        "/v1%2Ftasks".to_string(),
        "/%761/tasks".to_string(),
        "/metrics/../v1/tasks".to_string(),
        "/./v1/tasks".to_string(),
        "/healthz/../v1/tasks".to_string(),
        "/v1/tasks/".to_string(),
        format!("/v1/tasks/{}/", task.id),
        "/v1;/tasks".to_string(),
        "/v1/tasks;x=1".to_string(),
        "/v1/tasks#x".to_string(),
        "http://admin/v1/tasks".to_string(),
    ] {
        let resp = admin_raw(
            kw,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
        )
        .await;
        assert_ne!(resp.status, 200, "{path}: {}", resp.text());
        let body = String::from_utf8_lossy(&resp.body);
        assert!(!body.contains(&task.id), "{path}: {body}");
        assert!(!body.contains("\"tasks\""), "{path}: {body}");
    }
    assert_eq!(f.plain.hits() + f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

/// The standard policy plus one service per `(name, connect_to)`, each allowing everything, held
/// by agent `selfbot` (capability `NAME.any`).
fn policy_with_services_at(text: &str, targets: &[(String, String)]) -> String {
    let mut services = String::new();
    let mut capabilities = String::new();
    let mut caps = Vec::new();
    for (name, connect_to) in targets {
        let port = connect_to.rsplit_once(':').unwrap().1;
        services.push_str(&format!(
            r#"  {name}:
    hosts: [{name}.test]
    scheme: http
    port: {port}
    connect_to: "{connect_to}"
    allow_cleartext: true
    inject: {{ header: Authorization, value: "Bearer ${{credential}}", credential: api_token }}
"#
        ));
        capabilities.push_str(&format!(
            "  {name}.any:\n    service: {name}\n    risk: low\n    routes: [\"GET|POST|DELETE /{{*rest}}\"]\n"
        ));
        caps.push(format!("{name}.any"));
    }
    let agents = format!(
        "  selfbot:\n    owner: tests\n    capabilities: [{}]\n    max_ttl: 1h\n",
        caps.join(", ")
    );
    extend_policy(text, &services, &capabilities, &agents)
}

/// Every spelling of keyward's own listener addresses a `connect_to` could use.
fn own_listener_spellings(kw: &Harness) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for (what, port) in [
        ("proxy", kw.proxy_addr.port()),
        ("admin", kw.admin_addr.port()),
    ] {
        for (i, host) in ["127.0.0.1", "0.0.0.0", "localhost", "[::ffff:127.0.0.1]"]
            .iter()
            .enumerate()
        {
            v.push((format!("self{what}{i}"), format!("{host}:{port}")));
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_whose_connect_to_is_keywards_own_listener_is_a_blocked_address() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    // The listeners' ports are known once keyward runs: the services arrive by reload.
    let targets = own_listener_spellings(kw);
    let text = std::fs::read_to_string(&kw.policy_path).unwrap();
    std::fs::write(&kw.policy_path, policy_with_services_at(&text, &targets)).unwrap();
    let (status, v) = kw.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "reload: {v}");
    let caps: Vec<String> = targets.iter().map(|(n, _)| format!("{n}.any")).collect();
    let task = kw.mint("selfbot", json!(caps)).await;
    for (name, connect_to) in &targets {
        let host = format!("{name}.test");
        let port = connect_to.rsplit_once(':').unwrap().1;
        for path in ["/metrics", "/v1/tasks"] {
            let before = kw.audit_records().len();
            let resp = kw
                .raw(&format!(
                    "GET http://{host}:{port}{path} HTTP/1.1\r\nHost: {host}:{port}\r\nProxy-Authorization: {}\r\nConnection: close\r\n\r\n",
                    Harness::proxy_auth(&task),
                ))
                .await;
            let what = format!("connect_to {connect_to}, {path}");
            assert_no_admin_content(&resp, &what);
            assert_eq!(resp.status, 403, "{what}: {}", resp.text());
            let (_, rec) = kw.assert_denied_raw(&resp, 403, "blocked_address").await;
            assert_eq!(rec["host"], host.as_str(), "{rec}");
            // No connection was made: a request looped into the proxy listener would have
            // left a record of its own.
            let after = kw.audit_records();
            assert_eq!(after.len(), before + 1, "{what}: {after:?}");
        }
    }
    let (_, t) = kw
        .admin(Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(
        t["requests_used"], 0,
        "a refused request is not charged: {t}"
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_connect_to_keywards_own_listeners_is_a_blocked_address() {
    // `127.0.0.1` is a passthrough host of the standard policy; `localhost` resolves to it,
    // `0.0.0.0` is dialled as this host. (`::ffff:127.0.0.1`, 127.0.0.1 again, is not a host
    // a policy may name: its CONNECT is an unknown host.)
    let f = Fixture::start_with(|p| {
        p.replace("hosts: [localhost]", "hosts: [local.test]")
            .replace(
                "passthrough: [127.0.0.1]",
                "passthrough: [127.0.0.1, localhost, 0.0.0.0]",
            )
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    for port in [kw.proxy_addr.port(), kw.admin_addr.port()] {
        let (_, head) = connect_raw(
            kw.proxy_addr,
            &format!("[::ffff:127.0.0.1]:{port}"),
            Some(&Harness::proxy_auth(&task)),
        )
        .await;
        kw.saw(&head.text());
        kw.assert_denied_raw(&head, 403, "unknown_host").await;
    }
    for host in ["127.0.0.1", "localhost", "0.0.0.0"] {
        for port in [kw.proxy_addr.port(), kw.admin_addr.port()] {
            let before = kw.audit_records().len();
            let (_, head) = connect_raw(
                kw.proxy_addr,
                &format!("{host}:{port}"),
                Some(&Harness::proxy_auth(&task)),
            )
            .await;
            kw.saw(&head.text());
            let (_, rec) = kw.assert_denied_raw(&head, 403, "blocked_address").await;
            assert_eq!(rec["method"], "CONNECT", "{rec}");
            assert_eq!(rec["port"], port, "{rec}");
            let after = kw.audit_records();
            assert_eq!(after.len(), before + 1, "{after:?}");
        }
    }
    // Other loopback ports of a passthrough host are still tunnelled: only keyward is refused.
    let (_, head) = connect_raw(
        kw.proxy_addr,
        &format!("127.0.0.1:{}", f.tcp.addr.port()),
        Some(&Harness::proxy_auth(&task)),
    )
    .await;
    assert_eq!(head.status, 200, "{}", head.text());
    assert_eq!(kw.metric(LEAVES).await, Some(0.0));
    kw.assert_no_leaks().await;
}
