//! Fail closed: a credential that cannot be read (env unset, exec failing or silent, file
//! emptied, a value a header cannot carry) is `credential_unavailable` (502) and nothing is sent
//! without it; an audit sink that fails refuses every request (503) and turns `/readyz` false.

use std::time::Duration;

use serde_json::json;

use crate::common::{connect_raw, Fixture, Harness};
use crate::headers::{get, raw_req, tunnel_h1};

/// Polls `/readyz` (bounded) until `pred` holds for its body; returns (status, body).
async fn readyz_until(
    f: &Fixture,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> (u16, serde_json::Value) {
    for _ in 0..150 {
        let (status, v) = f.kw.admin(http::Method::GET, "/readyz", None).await;
        if pred(&v) {
            return (status, v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("/readyz never showed {what}");
}

fn unreadable(v: &serde_json::Value, name: &str) -> bool {
    v["credentials_unreadable"]
        .as_array()
        .is_some_and(|a| a.iter().any(|n| n == name))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unset_env_and_failing_exec_credentials_are_never_replaced_by_nothing() {
    let f = Fixture::start_with(|p| {
        p.replace(
            "api_token: { source: file:api-token }",
            "api_token: { source: env:KEYWARD_ATTACK_TEST_NEVER_SET_6F1D }",
        )
        .replace(
            "query_key: { source: file:query-key }",
            "query_key: { source: { exec: [\"false\"] }, refresh: 1h }",
        )
        .replace(
            "basic_pw: { source: file:basic-pw }",
            "basic_pw: { source: { exec: [\"true\"] }, refresh: 1h }",
        )
        .replace(
            "gone_token: { source: file:gone-token }",
            "gone_token: { source: { exec: [\"/nonexistent/keyward-secret-helper\"] }, refresh: 1h }",
        )
    })
    .await;
    let kw = &f.kw;
    let task = kw
        .mint(
            "bot",
            json!([
                "plain.issues.read",
                "query.search",
                "basic.whoami",
                "gone.ping",
                "local.ping"
            ]),
        )
        .await;
    let (status, v) = kw.admin(http::Method::GET, "/readyz", None).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["ready"], false);
    for name in ["api_token", "query_key", "basic_pw", "gone_token"] {
        assert!(unreadable(&v, name), "{name}: {v}");
    }
    for (host, path, credential) in [
        ("plain.test", "/echo", "api_token"),
        ("query.test", "/search?q=1&api_key=agent-dummy", "query_key"),
        ("basic.test", "/whoami", "basic_pw"),
        ("gone.test", "/ping", "gone_token"),
    ] {
        let resp = kw
            .raw(&raw_req(
                &f,
                "GET",
                host,
                path,
                &task,
                "Authorization: Bearer agent-dummy\r\n",
            ))
            .await;
        let (_, rec) = kw
            .assert_denied_raw(&resp, 502, "credential_unavailable")
            .await;
        assert_eq!(rec["host"], host);
        assert!(
            rec["credential"].is_null() || rec["credential"] == credential,
            "{rec}"
        );
    }
    assert_eq!(
        f.plain.hits(),
        0,
        "a request went out without its credential"
    );
    let (_, t) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(t["requests_used"], 0, "refusals are not charged: {t}");
    // A service whose credential is readable still works (the failure is per credential).
    let other = kw.mint("bot", json!(["secure.read"])).await;
    let mut conn = tunnel_h1(&f, &other, "secure.test").await;
    let host = format!("secure.test:{}", f.tls.port());
    let ok = crate::common::h1_send(&mut conn, get("/echo", &host)).await;
    kw.saw(&ok.text());
    assert_eq!(ok.status, 200);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptied_credential_file_is_refused_inside_an_open_tunnel() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut conn = tunnel_h1(&f, &task, "secure.test").await;
    let host = format!("secure.test:{}", f.tls.port());
    let ok = crate::common::h1_send(&mut conn, get("/echo", &host)).await;
    kw.saw(&ok.text());
    assert_eq!(ok.status, 200);
    assert_eq!(f.tls.hits(), 1);
    // Emptied in place (a newline only: no value), as a broken secret rotation would leave it.
    std::fs::write(kw.path("tls-token"), "\n").unwrap();
    readyz_until(&f, "tls_token unreadable", |v| unreadable(v, "tls_token")).await;
    let resp = crate::common::h1_send(&mut conn, get("/echo", &host)).await;
    kw.saw(&resp.text());
    kw.assert_denied_raw(&resp, 502, "credential_unavailable")
        .await;
    assert_eq!(f.tls.hits(), 1, "a request went out without its credential");
    // Restored: served again, with the new value.
    std::fs::write(kw.path("tls-token"), "sk_live_tls_rotated_0123456789\n").unwrap();
    kw.add_secret("sk_live_tls_rotated_0123456789");
    readyz_until(&f, "tls_token readable", |v| !unreadable(v, "tls_token")).await;
    let resp = crate::common::h1_send(&mut conn, get("/echo", &host)).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200);
    assert_eq!(
        f.tls.last().header_all("x-api-key"),
        vec!["sk_live_tls_rotated_0123456789".to_string()]
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_value_a_header_cannot_carry_is_never_injected() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad-token");
    let value = "sk_live_bad\r\nX-Injected: yes";
    std::fs::write(&bad, format!("{value}\n")).unwrap();
    let bad_path = bad.display().to_string();
    let f = Fixture::start_with(|p| {
        p.replace(
            "api_token: { source: file:api-token }",
            &format!("api_token: {{ source: \"file:{bad_path}\" }}"),
        )
    })
    .await;
    let kw = &f.kw;
    kw.add_secret("sk_live_bad");
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let resp = kw
        .raw(&raw_req(&f, "GET", "plain.test", "/echo", &task, ""))
        .await;
    kw.assert_denied_raw(&resp, 502, "credential_unavailable")
        .await;
    assert_eq!(f.plain.hits(), 0);
    assert!(resp.header("x-injected").is_none());
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_audit_sink_refuses_every_request_and_readyz_turns_false() {
    let f = Fixture::start_with(|p| p.replace("  path: audit.jsonl", "  path: /dev/full")).await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["plain.issues.read", "secure.read"]))
        .await;
    let (status, v) = kw.admin(http::Method::GET, "/readyz", None).await;
    assert_eq!(status, 200, "{v}");
    // A tunnel opened while the sink still looked healthy.
    let mut conn = tunnel_h1(&f, &task, "secure.test").await;
    // The first record cannot be written (ENOSPC): a denial, so nothing goes upstream.
    let resp = kw
        .raw(&raw_req(&f, "GET", "plain.test", "/nope", &task, ""))
        .await;
    assert_eq!(resp.status, 403);
    let (status, v) = readyz_until(&f, "audit_ok false", |v| v["audit_ok"] == false).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["ready"], false);
    // From now on nothing is served: plain, CONNECT, and inside the open tunnel.
    let resp = kw
        .raw(&raw_req(&f, "GET", "plain.test", "/echo", &task, ""))
        .await;
    assert_eq!(resp.status, 503, "{}", resp.text());
    let problem: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    assert_eq!(problem["status"], 503);
    let (_tcp, resp) = connect_raw(
        kw.proxy_addr,
        &format!("secure.test:{}", f.tls.port()),
        Some(&Harness::proxy_auth(&task)),
    )
    .await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 503, "{}", resp.text());
    let host = format!("secure.test:{}", f.tls.port());
    let resp = crate::common::h1_send(&mut conn, get("/echo", &host)).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 503, "{}", resp.text());
    assert_eq!(f.plain.hits(), 0);
    assert_eq!(f.tls.hits(), 0);
    // The failure stays: a restart is required.
    let (status, _) = kw.admin(http::Method::GET, "/readyz", None).await;
    assert_eq!(status, 503);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_file_replaced_by_a_directory_is_unavailable() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    std::fs::remove_file(kw.path("api-token")).unwrap();
    std::fs::create_dir(kw.path("api-token")).unwrap();
    readyz_until(&f, "api_token unreadable", |v| unreadable(v, "api_token")).await;
    let resp = kw
        .raw(&raw_req(
            &f,
            "GET",
            "plain.test",
            "/echo",
            &task,
            "Authorization: Bearer dummy\r\n",
        ))
        .await;
    kw.assert_denied_raw(&resp, 502, "credential_unavailable")
        .await;
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}
