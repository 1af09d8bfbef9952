//! The admin API (SPEC §5): the admin token, minting and its validation, listing without
//! tokens, revocation, reload (invalid keeps the old policy, valid applies at once), metrics
//! names and label hygiene, health and readiness.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{Fixture, Harness};
use http::Method;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_refuse_a_missing_or_wrong_token_with_401() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let wrong = format!("{}x", kw.admin_token);
    let routes = [
        (Method::GET, "/v1/tasks".to_string(), None),
        (
            Method::POST,
            "/v1/tasks".to_string(),
            Some(json!({"agent": "bot", "intent": ["plain.issues.read"]})),
        ),
        (Method::GET, format!("/v1/tasks/{}", task.id), None),
        (Method::DELETE, format!("/v1/tasks/{}", task.id), None),
        (Method::POST, "/v1/reload".to_string(), None),
    ];
    for (method, path, body) in routes {
        for token in [
            None,
            Some(wrong.as_str()),
            Some(task.token.as_str()),
            Some(""),
        ] {
            let (status, v) = kw
                .admin_as(token, method.clone(), &path, body.clone())
                .await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {v}");
            kw.saw(&v.to_string());
        }
    }
    // Basic instead of Bearer, even with the right secret.
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(kw.admin_url("/v1/tasks"))
        .header("authorization", common::basic("admin", &kw.admin_token))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    // Nothing was revoked or minted by those calls.
    let (_, list) = kw.admin(Method::GET, "/v1/tasks", None).await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["tasks"][0]["status"], "active", "{list}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_returns_task_token_expiry_and_proxy_url() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let (status, v) = kw
        .mint_body(json!({
            "agent": "bot",
            "task": "TICKET-123",
            "intent": ["plain.issues.read", {"capability": "secure.read", "where": {"owner": "acme", "repo": "web"}}],
            "ttl": "30m",
            "max_requests": 500
        }))
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["task"], "TICKET-123");
    let token = v["token"].as_str().unwrap();
    assert!(token.starts_with("kw_"), "token prefix");
    // At least 128 bits of randomness: 22+ base64 characters after the prefix.
    assert!(token.len() >= 3 + 22, "token too short");
    let expires = v["expires_at"].as_str().unwrap();
    assert!(expires.ends_with('Z') && expires.contains('T'), "{expires}");
    assert_eq!(
        v["proxy_url"],
        format!("http://TICKET-123:{token}@{}", kw.proxy_addr)
    );
    // A generated id when none is given, and a different token each time.
    let (status, w) = kw
        .mint_body(json!({"agent": "bot", "intent": ["plain.issues.read"]}))
        .await;
    assert_eq!(status, 201, "{w}");
    assert!(w["task"].as_str().is_some_and(|t| !t.is_empty()));
    assert_ne!(w["task"], v["task"]);
    assert_ne!(w["token"], v["token"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_refuses_invalid_requests_with_400_and_a_reason() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let cases = [
        (
            "unknown agent",
            json!({"agent": "nobody", "intent": ["plain.issues.read"]}),
            "unknown_agent",
        ),
        (
            "unknown capability",
            json!({"agent": "bot", "intent": ["no.such.capability"]}),
            "unknown_capability",
        ),
        (
            "capability not granted to the agent",
            json!({"agent": "reader", "intent": ["secure.read"]}),
            "capability_not_granted",
        ),
        (
            "constraint on a parameter no route has",
            json!({"agent": "bot", "intent": [{"capability": "plain.issues.read", "where": {"nope": "x"}}]}),
            "invalid_constraint",
        ),
        (
            "ttl over the agent's max_ttl",
            json!({"agent": "reader", "intent": ["plain.issues.read"], "ttl": "11m"}),
            "invalid_ttl",
        ),
        // A misspelt `where` must not mint the capability unconstrained.
        (
            "unknown key in an intent item",
            json!({"agent": "bot", "intent": [{"capability": "plain.issues.read", "Where": {"owner": "acme"}}]}),
            "bad_json",
        ),
        // What the listing shows must be what is enforced: no second entry to choose between.
        (
            "a capability twice",
            json!({"agent": "bot", "intent": [
                {"capability": "plain.issues.read", "where": {"owner": "acme"}},
                {"capability": "plain.issues.read", "where": {"owner": "evil"}}]}),
            "duplicate_capability",
        ),
        (
            "a parameter constrained by the item and the intent-wide where",
            json!({"agent": "bot",
                "intent": [{"capability": "plain.issues.read", "where": {"owner": "evil"}}],
                "where": {"owner": "acme"}}),
            "invalid_constraint",
        ),
        (
            "an empty constraint value",
            json!({"agent": "bot", "intent": [{"capability": "plain.issues.read", "where": {"owner": ""}}]}),
            "invalid_constraint",
        ),
        (
            "a constraint value with a control character",
            json!({"agent": "bot", "intent": [{"capability": "plain.issues.read", "where": {"owner": "acme\u{0}x"}}]}),
            "invalid_constraint",
        ),
        // Tasks that could never be used: expired before their first request, or held to a
        // value no single path segment is.
        // The same code for every bad ttl, unparsable or out of range: one branch for scripts.
        (
            "a ttl that is not a duration",
            json!({"agent": "bot", "intent": ["plain.issues.read"], "ttl": "30M"}),
            "invalid_ttl",
        ),
        (
            "a ttl under a second",
            json!({"agent": "bot", "intent": ["plain.issues.read"], "ttl": "500ms"}),
            "invalid_ttl",
        ),
        (
            "a one-segment parameter held to a value with a slash",
            json!({"agent": "bot", "intent": [{"capability": "plain.issues.read", "where": {"owner": "acme/web"}}]}),
            "invalid_constraint",
        ),
        (
            "a value no request path holds as written (raw non-ASCII)",
            json!({"agent": "bot", "intent": [{"capability": "plain.issues.read", "where": {"owner": "acm\u{e9}"}}]}),
            "invalid_constraint",
        ),
        (
            "a value no request path holds as written (a space)",
            json!({"agent": "bot", "intent": [{"capability": "plain.issues.read", "where": {"owner": "ac me"}}]}),
            "invalid_constraint",
        ),
        (
            "a task id that is a dot segment",
            json!({"agent": "bot", "task": "..", "intent": ["plain.issues.read"]}),
            "invalid_task_id",
        ),
        // Held for the task's life: the values of one task are bounded.
        (
            "more constraint values than a task may hold",
            json!({"agent": "bot", "intent": [{"capability": "plain.issues.read",
                "where": {"owner": (0..4097).map(|i| format!("o{i}")).collect::<Vec<_>>()}}]}),
            "invalid_constraint",
        ),
        // The intent-wide `where` is held once per capability it applies to: counted so,
        // before it is copied.
        (
            "an intent-wide where over the cap only once copied",
            json!({"agent": "bot", "intent": ["plain.issues.read", "plain.labels.write"],
                "where": {"owner": (0..2100).map(|i| format!("o{i}")).collect::<Vec<_>>()}}),
            "invalid_constraint",
        ),
        (
            "constraint values over the byte cap once copied",
            json!({"agent": "bot", "intent": ["plain.issues.read", "plain.labels.write"],
                "where": {"owner": (0..5).map(|i| format!("{i}{}", "o".repeat(8000))).collect::<Vec<_>>()}}),
            "invalid_constraint",
        ),
    ];
    for (what, body, code) in cases {
        let (status, v) = kw.mint_body(body).await;
        assert_eq!(status, 400, "{what}: {v}");
        assert_eq!(v["error"], code, "{what}: {v}");
        // SPEC §5: "400 with a reason".
        assert_eq!(v["reason"], code, "{what}: {v}");
        assert!(v["message"].is_string(), "{what}: {v}");
        assert!(v.get("token").is_none(), "{what}: {v}");
        kw.saw(&v.to_string());
    }
    // An intent-wide `where` on a parameter none of the capabilities has: said as such, not
    // as a capability named by the intent's names joined.
    let (status, v) = kw
        .mint_body(json!({"agent": "bot", "intent": ["plain.issues.read", "query.search"], "where": {"bogus": "1"}}))
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["reason"], "invalid_constraint", "{v}");
    assert_eq!(
        v["message"], "no capability of the intent has a route with parameter `bogus`",
        "{v}"
    );
    // A parameter named twice in `where` (JSON a `Value` cannot hold): refused, not "the last
    // one wins", in an item's `where` and in the intent-wide one.
    for raw in [
        r#"{"agent":"bot","intent":[{"capability":"plain.issues.read","where":{"owner":"acme","owner":"evil"}}]}"#,
        r#"{"agent":"bot","intent":["plain.issues.read"],"where":{"owner":"acme","owner":"evil"}}"#,
    ] {
        let resp = kw
            .http
            .post(kw.admin_url("/v1/tasks"))
            .bearer_auth(&kw.admin_token)
            .header("content-type", "application/json")
            .body(raw)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400, "{raw}");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["error"], "bad_json", "{v}");
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("`owner` is named twice"),
            "{v}"
        );
    }
    // The message says what is wrong, not only that the item matched no form.
    for (body, says) in [
        (
            json!({"agent": "bot", "intent": [{"capability": "plain.issues.read", "Where": {"owner": "acme"}}]}),
            "unknown field `Where`",
        ),
        (
            json!({"agent": "bot", "intent": [{"capability": "plain.issues.read", "where": {"owner": 123}}]}),
            "a string or a list of strings",
        ),
        (json!({"agent": "bot", "intent": [7]}), "a capability name"),
        // `M` is months to humantime: never taken for minutes.
        (
            json!({"agent": "bot", "intent": ["plain.issues.read"], "ttl": "30M"}),
            "`M` is months",
        ),
        (
            json!({"agent": "reader", "intent": ["plain.issues.read"], "ttl": "18446744073709551s"}),
            "exceeds agent `reader`'s max_ttl of 600s",
        ),
    ] {
        let (status, v) = kw.mint_body(body.clone()).await;
        assert_eq!(status, 400, "{body}: {v}");
        let message = v["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    let (_, list) = kw.admin(Method::GET, "/v1/tasks", None).await;
    assert_eq!(list["tasks"].as_array().unwrap().len(), 0, "{list}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_task_id_is_409() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let body = json!({"agent": "bot", "task": "TICKET-7", "intent": ["plain.issues.read"]});
    let first = kw.mint_with(body.clone()).await;
    let (status, v) = kw.mint_body(body).await;
    assert_eq!(status, 409, "{v}");
    assert!(v.get("token").is_none(), "{v}");
    // The first task's token still works: the conflict did not replace it.
    let resp = kw
        .send(kw.agent(&first).get(f.plain_url("plain.test", "/echo")))
        .await;
    assert_eq!(resp.status, 200);
    kw.assert_no_leaks().await;
}

/// A minting loop cannot grow keyward without end: past `admin.max_tasks` a mint is a 503
/// that says why, an ended task gives its place at once, and the tasks held keep working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mint_past_admin_max_tasks_is_503_until_a_task_ends() {
    let f = Fixture::start_with(|p| {
        p.replacen(
            "  token: file:admin-token\n",
            "  token: file:admin-token\n  max_tasks: 2\n",
            1,
        )
    })
    .await;
    let kw = &f.kw;
    let mint = |id: &str| json!({"agent": "bot", "task": id, "intent": ["plain.issues.read"]});
    let first = kw.mint_with(mint("one")).await;
    kw.mint_with(mint("two")).await;
    let (status, v) = kw.mint_body(mint("three")).await;
    assert_eq!(status, 503, "{v}");
    assert!(v.get("token").is_none(), "{v}");
    assert!(v.to_string().contains("too_many_tasks"), "{v}");
    let raw = kw
        .http
        .post(kw.admin_url("/v1/tasks"))
        .bearer_auth(&kw.admin_token)
        .json(&mint("four"))
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status().as_u16(), 503);
    assert_eq!(
        raw.headers().get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert!(v.to_string().contains("admin.max_tasks"), "{v}");
    // The tasks held still work.
    let resp = kw
        .send(kw.agent(&first).get(f.plain_url("plain.test", "/echo")))
        .await;
    assert_eq!(resp.status, 200);

    let (status, v) = kw.admin(Method::DELETE, "/v1/tasks/two", None).await;
    assert_eq!(status, 200, "{v}");
    let (status, v) = kw.mint_body(mint("three")).await;
    assert_eq!(status, 201, "{v}");
    // The revoked task was forgotten to make room: no longer listed.
    let (_, listing) = kw.admin(Method::GET, "/v1/tasks", None).await;
    let ids: Vec<&str> = listing["tasks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["task"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2, "{listing}");
    assert!(ids.contains(&"one") && ids.contains(&"three"), "{listing}");
    kw.assert_no_leaks().await;
}

/// `limit` and `after` page the list in id order: every task once, `next` on every page but
/// the last, and filters apply within pages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_listing_pages_with_limit_and_after() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    for (id, agent) in [
        ("p5", "bot"),
        ("p1", "reader"),
        ("p3", "bot"),
        ("p2", "bot"),
        ("p4", "reader"),
    ] {
        kw.mint_with(json!({"agent": agent, "task": id, "intent": ["plain.issues.read"]}))
            .await;
    }
    let page = |query: String| async move {
        let (status, list) = kw
            .admin(Method::GET, &format!("/v1/tasks?{query}"), None)
            .await;
        assert_eq!(status, 200, "{query}: {list}");
        let ids: Vec<String> = list["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task"].as_str().unwrap().to_string())
            .collect();
        (ids, list["next"].as_str().map(String::from))
    };
    let mut seen = Vec::new();
    let mut query = "limit=2".to_string();
    loop {
        let (ids, next) = page(query.clone()).await;
        assert!(ids.len() <= 2, "{ids:?}");
        seen.extend(ids);
        match next {
            Some(after) => query = format!("limit=2&after={after}"),
            None => break,
        }
    }
    assert_eq!(seen, ["p1", "p2", "p3", "p4", "p5"]);
    // A page that holds the rest exactly has no `next`; a filter applies before the cut.
    assert_eq!(
        page("after=p3".into()).await,
        (vec!["p4".into(), "p5".into()], None)
    );
    assert_eq!(
        page("agent=bot&limit=1&after=p2".into()).await,
        (vec!["p3".into()], Some("p3".into()))
    );
    // The cursor need not exist any more.
    assert_eq!(page("after=p25&limit=5".into()).await.0, ["p3", "p4", "p5"]);
    for query in [
        "limit=0",
        "limit=10001",
        "limit=x",
        "limit=+3",
        "after=a%20b",
        "after=",
        "limit=1&limit=2",
    ] {
        let (status, err) = kw
            .admin(Method::GET, &format!("/v1/tasks?{query}"), None)
            .await;
        assert_eq!(status, 400, "{query}: {err}");
        assert_eq!(err["reason"], "bad_query", "{query}: {err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_listing_shows_intent_expiry_and_counts_but_never_tokens() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let a = kw
        .mint_with(json!({
            "agent": "bot",
            "task": "list-a",
            "intent": [{"capability": "plain.issues.read", "where": {"owner": "acme"}}],
            "max_requests": 5
        }))
        .await;
    let b = kw.mint("reader", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&a);
    assert_eq!(
        kw.send(agent.get(f.plain_url("plain.test", "/repos/acme/web/issues")))
            .await
            .status,
        200
    );
    assert_eq!(
        kw.send(agent.get(f.plain_url("plain.test", "/repos/evil/web/issues")))
            .await
            .status,
        403
    );
    let (status, list) = kw.admin(Method::GET, "/v1/tasks", None).await;
    assert_eq!(status, 200);
    let text = list.to_string();
    for t in [&a, &b] {
        assert!(text.contains(&t.id), "{text}");
        common::assert_absent(&t.token, "GET /v1/tasks", &text);
    }
    assert!(!text.contains("\"token\""), "{text}");
    let (status, one) = kw.admin(Method::GET, "/v1/tasks/list-a", None).await;
    assert_eq!(status, 200);
    common::assert_absent(&a.token, "GET /v1/tasks/{id}", &one.to_string());
    assert_eq!(one["task"], "list-a");
    assert_eq!(one["agent"], "bot");
    assert_eq!(one["status"], "active");
    assert!(one["expires_at"].is_string());
    assert_eq!(one["max_requests"], 5);
    assert_eq!(one["requests_used"], 1, "{one}");
    assert_eq!(
        one["intent"],
        json!([{"capability": "plain.issues.read", "where": {"owner": ["acme"]}}])
    );
    let (status, _) = kw.admin(Method::GET, "/v1/tasks/no-such-task", None).await;
    assert_eq!(status, 404);

    // Filters: one agent's tasks, tasks in one state; anything else is a 400 that says why.
    let ids = |list: &Value| -> Vec<String> {
        list["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["task"].as_str().unwrap().to_string())
            .collect()
    };
    let (_, list) = kw.admin(Method::GET, "/v1/tasks?agent=reader", None).await;
    assert_eq!(ids(&list), [b.id.as_str()]);
    kw.revoke(&b.id).await;
    let (_, list) = kw.admin(Method::GET, "/v1/tasks?status=active", None).await;
    assert_eq!(ids(&list), ["list-a"]);
    let (_, list) = kw
        .admin(Method::GET, "/v1/tasks?status=revoked&agent=reader", None)
        .await;
    assert_eq!(ids(&list), [b.id.as_str()]);
    let (_, list) = kw.admin(Method::GET, "/v1/tasks?agent=nobody", None).await;
    assert_eq!(ids(&list), Vec::<String>::new());
    for query in [
        "status=gone",
        "agent=",
        "agent=a%20b",
        "owner=acme",
        "agent=bot&agent=reader",
    ] {
        let (status, err) = kw
            .admin(Method::GET, &format!("/v1/tasks?{query}"), None)
            .await;
        assert_eq!(status, 400, "{query}: {err}");
        assert_eq!(err["reason"], "bad_query", "{query}: {err}");
    }
    // No other route takes any: not ignored, and a DELETE with one revokes nothing, a POST
    // mints or reloads nothing.
    for (method, path) in [
        (Method::GET, "/v1/tasks/list-a?force=1"),
        (Method::DELETE, "/v1/tasks/list-a?force=1"),
        (Method::POST, "/v1/tasks?agent=bot"),
        (Method::POST, "/v1/reload?dry_run=1"),
    ] {
        let body = (method == Method::POST && path.starts_with("/v1/tasks"))
            .then(|| json!({"agent": "bot", "intent": ["plain.issues.read"]}));
        let (status, err) = kw.admin(method.clone(), path, body).await;
        assert_eq!(status, 400, "{method} {path}: {err}");
        assert_eq!(err["reason"], "bad_query", "{method} {path}: {err}");
    }
    assert_eq!(
        kw.metric("keyward_policy_reloads_total{result=\"ok\"}")
            .await,
        Some(0.0)
    );
    let (_, list) = kw.admin(Method::GET, "/v1/tasks?status=active", None).await;
    assert_eq!(ids(&list), ["list-a"]);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoke_takes_effect_at_once() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&task);
    let url = f.plain_url("plain.test", "/echo");
    assert_eq!(kw.send(agent.get(&url)).await.status, 200);
    kw.revoke(&task.id).await;
    let (_, t) = kw
        .admin(Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(t["status"], "revoked", "{t}");
    let resp = kw.send(agent.get(&url)).await;
    kw.assert_denied(&resp, 407, "task_revoked").await;
    let (status, _) = kw
        .admin(Method::DELETE, "/v1/tasks/no-such-task", None)
        .await;
    assert_eq!(status, 404);
    // The agent's series stays, at 0 (it does not vanish), and so does every other agent's.
    assert_eq!(
        kw.metric("keyward_tasks_active{agent=\"bot\"}").await,
        Some(0.0)
    );
    assert_eq!(
        kw.metric("keyward_tasks_active{agent=\"reader\"}").await,
        Some(0.0)
    );
    kw.assert_no_leaks().await;
}

/// The standard policy without `GET|POST /echo` in `plain.issues.read`.
fn without_plain_echo(policy: &str) -> String {
    let narrowed = policy.replacen("      - GET|POST /echo\n", "", 1);
    assert_ne!(narrowed, policy);
    narrowed
}

/// Two reloads that overlap: the one asked for last reads the file last and its policy is the
/// one that serves. (The first, held up by a slow credential `exec`, used to finish last and
/// put back the older file's policy, and with it a route the file no longer grants.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_reloads_leave_the_newest_policy_serving() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&task);
    let url = f.plain_url("plain.test", "/echo");
    let original = std::fs::read_to_string(&kw.policy_path).unwrap();
    let slow_mark = kw.policy_path.with_file_name("slow");
    let started = kw.policy_path.with_file_name("exec-started");
    let with_slow_exec = |policy: &str| {
        let exec = format!(
            "credentials:\n  slow: {{ source: {{ exec: [sh, -c, 'touch {}; test -f {} && sleep 3; echo tok'] }} }}\n",
            started.display(),
            slow_mark.display()
        );
        policy.replacen("credentials:\n", &exec, 1)
    };
    std::fs::write(&slow_mark, "").unwrap();
    std::fs::write(&kw.policy_path, with_slow_exec(&original)).unwrap();
    let first = kw.admin(Method::POST, "/v1/reload", None);
    let second = async {
        // Once the first reload is in its `exec` (it read the file), the file changes and a
        // second reload is asked.
        common::bounded("the first reload's exec", async {
            while !started.exists() {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await;
        std::fs::remove_file(&slow_mark).unwrap();
        let narrowed = with_slow_exec(&without_plain_echo(&original));
        std::fs::write(&kw.policy_path, narrowed).unwrap();
        kw.admin(Method::POST, "/v1/reload", None).await
    };
    let ((status1, first), (status2, second)) = tokio::join!(first, second);
    assert_eq!((status1, status2), (200, 200), "{first} {second}");
    assert_ne!(first["policy_version"], second["policy_version"]);

    let (_, ready) = kw.admin(Method::GET, "/readyz", None).await;
    assert_eq!(ready["policy_version"], second["policy_version"], "{ready}");
    let resp = kw.send(agent.get(&url)).await;
    kw.assert_denied(&resp, 403, "route_not_in_intent").await;
    kw.assert_no_leaks().await;
}

/// A reload re-runs every credential `exec`; one that fails then (its secret store briefly
/// down, during a log rotation's SIGHUP) keeps the value it gave before, as a failed refresh
/// does, instead of leaving the credential unusable until its next `refresh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_whose_exec_fails_keeps_the_value_it_read_before() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&task);
    let url = f.plain_url("plain.test", "/echo");
    let token_file = kw.policy_path.with_file_name("api-token");
    let outage = kw.policy_path.with_file_name("outage");
    let original = std::fs::read_to_string(&kw.policy_path).unwrap();
    let exec = format!(
        "api_token: {{ source: {{ exec: [sh, -c, 'test -f {} && exit 3; cat {}'] }}, refresh: 10m }}",
        outage.display(),
        token_file.display()
    );
    let with_exec = original.replacen("api_token: { source: file:api-token }", &exec, 1);
    assert_ne!(with_exec, original);
    std::fs::write(&kw.policy_path, &with_exec).unwrap();
    let (status, v) = kw.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(kw.send(agent.get(&url)).await.status, 200);

    std::fs::write(&outage, "").unwrap();
    let (status, v) = kw.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{v}");
    let resp = kw.send(agent.get(&url)).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(
        f.plain.last().header("authorization"),
        Some(format!("Bearer {}", f.creds.api_token))
    );
    let (_, ready) = kw.admin(Method::GET, "/readyz", None).await;
    assert_eq!(ready["credentials_unreadable"], json!([]), "{ready}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_with_an_invalid_policy_keeps_the_old_one_serving() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&task);
    let url = f.plain_url("plain.test", "/echo");
    let original = std::fs::read_to_string(&kw.policy_path).unwrap();
    let (_, ready) = kw.admin(Method::GET, "/readyz", None).await;
    let version = ready["policy_version"].clone();

    // Two problems: an unknown key, and a reference to an undefined credential.
    let broken = without_plain_echo(&original)
        .replacen("agents:\n", "surprise: true\nagents:\n", 1)
        .replacen("credential: basic_pw", "credential: no_such_credential", 1);
    std::fs::write(&kw.policy_path, &broken).unwrap();
    let (status, v) = kw.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 400, "{v}");
    let errors: Vec<&str> = v["errors"]
        .as_array()
        .unwrap_or_else(|| panic!("no error list: {v}"))
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert!(errors.len() >= 2, "every error is reported: {errors:?}");
    let file = kw.policy_path.display().to_string();
    for e in &errors {
        let rest = e
            .strip_prefix(&format!("{file}:"))
            .unwrap_or_else(|| panic!("not file:line:column: {e}"));
        let mut parts = rest.splitn(3, ':');
        assert!(parts.next().unwrap().parse::<u32>().is_ok(), "line: {e}");
        assert!(parts.next().unwrap().parse::<u32>().is_ok(), "column: {e}");
    }
    assert!(errors.iter().any(|e| e.contains("surprise")), "{errors:?}");
    assert!(
        errors
            .iter()
            .any(|e| e.contains("no_such_credential") || e.contains("basic.inject")),
        "{errors:?}"
    );
    // The old policy still decides: /echo is still allowed.
    let resp = kw.send(agent.get(&url)).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let (_, ready) = kw.admin(Method::GET, "/readyz", None).await;
    assert_eq!(ready["policy_version"], version);
    assert_eq!(
        kw.metric("keyward_policy_reloads_total{result=\"error\"}")
            .await,
        Some(1.0)
    );

    // A valid policy applies at once, to tasks minted before it.
    std::fs::write(&kw.policy_path, without_plain_echo(&original)).unwrap();
    let (status, v) = kw.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["restart_required"], json!([]), "{v}");
    assert_eq!(v["credentials_unreadable"], json!([]), "{v}");
    let resp = kw.send(agent.get(&url)).await;
    let (_, rec) = kw.assert_denied(&resp, 403, "route_not_in_intent").await;
    assert_ne!(rec["policy_version"], version, "the new policy decided");
    assert_eq!(
        kw.metric("keyward_policy_reloads_total{result=\"ok\"}")
            .await,
        Some(1.0)
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_methods_and_unknown_tasks_get_a_reason_in_words() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    for (method, path, allow) in [
        (Method::GET, "/v1/reload", "POST"),
        (Method::DELETE, "/v1/tasks", "GET, POST"),
        (Method::POST, "/v1/tasks/some-id", "GET, DELETE"),
        (Method::POST, "/metrics", "GET, HEAD"),
        (Method::PUT, "/healthz", "GET, HEAD"),
        (Method::DELETE, "/readyz", "GET, HEAD"),
    ] {
        let resp = kw
            .http
            .request(method.clone(), kw.admin_url(path))
            .bearer_auth(&kw.admin_token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method} {path}");
        assert_eq!(resp.headers()["allow"], allow, "{method} {path}");
        let v: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(v["error"], "method_not_allowed", "{v}");
        assert!(v["message"].is_string(), "{v}");
    }
    for method in [Method::GET, Method::DELETE] {
        let (status, v) = kw.admin(method, "/v1/tasks/no-such-task", None).await;
        assert_eq!(status, 404, "{v}");
        assert_eq!(v["error"], "unknown_task", "{v}");
        assert_eq!(v["message"], "no task has this id", "{v}");
    }
    // Probes and scrapers may ask with HEAD.
    for path in ["/healthz", "/readyz", "/metrics"] {
        let resp = kw.http.head(kw.admin_url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "HEAD {path}");
    }
    // A mint body over the limit is 413, not a malformed request.
    let big =
        json!({"agent": "bot", "intent": ["plain.issues.read"], "task": "x".repeat(70 * 1024)});
    let (status, v) = kw.admin(Method::POST, "/v1/tasks", Some(big)).await;
    assert_eq!(
        (status, &v["error"]),
        (413, &json!("body_too_large")),
        "{v}"
    );
    // ...and said at once when the length is declared, not after waiting for the body.
    let mut tcp = tokio::net::TcpStream::connect(kw.admin_addr).await.unwrap();
    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 999999999\r\n\r\n{{",
        kw.admin_token
    );
    tokio::io::AsyncWriteExt::write_all(&mut tcp, head.as_bytes())
        .await
        .unwrap();
    let answer = common::read_response(&mut tcp).await;
    assert_eq!(answer.status, 413, "{}", answer.text());
    // The body is a JSON object: serde would read a struct from an array of its fields.
    let resp = kw
        .http
        .post(kw.admin_url("/v1/tasks"))
        .bearer_auth(&kw.admin_token)
        .header("content-type", "application/json")
        .body(r#"["bot","arr1",["plain.issues.read"],"10m",5,{}]"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 400);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["error"], "bad_json", "{v}");
    let (status, _) = kw.admin(Method::GET, "/v1/tasks/arr1", None).await;
    assert_eq!(status, 404);
    let (status, v) = kw.admin(Method::GET, "/v1/nothing-here", None).await;
    assert_eq!((status, &v["error"]), (404, &json!("not_found")), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_names_the_settings_only_a_restart_applies() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let original = std::fs::read_to_string(&kw.policy_path).unwrap();
    let changed = original.replacen(
        "  listen: 127.0.0.1:0\nadmin:",
        "  listen: 127.0.0.1:0\n  upstream_timeout: 2s\n  max_connections: 7\nadmin:",
        1,
    );
    assert_ne!(changed, original);
    std::fs::write(&kw.policy_path, &changed).unwrap();
    let (status, v) = kw.admin(Method::POST, "/v1/reload", None).await;
    // The rest of the policy applies; these two wait for a restart, and the operator is told.
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["restart_required"],
        json!(["proxy.max_connections", "proxy.upstream_timeout"]),
        "{v}"
    );
    assert!(
        common::captured_logs().contains("apply only after a restart"),
        "a warning in the log"
    );
}

/// Label names each SPEC §8 family may carry (plus Prometheus' own `le`).
const FAMILIES: [(&str, &str, &[&str]); 7] = [
    (
        "keyward_decisions_total",
        "counter",
        &["decision", "reason", "service", "capability", "agent"],
    ),
    (
        "keyward_request_duration_seconds",
        "histogram",
        &["service", "le"],
    ),
    (
        "keyward_upstream_errors_total",
        "counter",
        &["service", "kind"],
    ),
    ("keyward_tasks_active", "gauge", &["agent"]),
    ("keyward_connections_open", "gauge", &["kind"]),
    ("keyward_tls_leaf_certs_issued_total", "counter", &[]),
    ("keyward_policy_reloads_total", "counter", &["result"]),
];

fn label_names(line: &str) -> Vec<String> {
    let Some((_, rest)) = line.split_once('{') else {
        return Vec::new();
    };
    let labels = rest.rsplit_once('}').unwrap().0;
    labels
        .split("\",")
        .filter(|kv| !kv.is_empty())
        .map(|kv| kv.split_once('=').unwrap().0.to_string())
        .collect()
}

/// Each service's failure and redaction series exist at 0 from the start, and a reload's new
/// service gets them too: `increase()` sees a pod's first TLS failure or first echoed
/// credential (a series that first appears at 1 shows no increase, and the alert on it would
/// stay silent).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_and_redaction_series_start_at_zero_for_every_service() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let text = kw.metrics().await;
    for kind in ["dns", "connect", "tls", "timeout", "protocol"] {
        let series = format!("keyward_upstream_errors_total{{kind=\"{kind}\",service=\"secure\"}}");
        assert_eq!(common::metric_value(&text, &series), Some(0.0), "{series}");
    }
    let redacted = "keyward_secrets_redacted_total{service=\"plain\"}";
    assert_eq!(common::metric_value(&text, redacted), Some(0.0));
    // Only series that can grow: no TLS failure for a plain-HTTP service.
    let plain_tls = "keyward_upstream_errors_total{kind=\"tls\",service=\"plain\"}";
    assert_eq!(common::metric_value(&text, plain_tls), None);
    // A service added by a reload.
    let policy = std::fs::read_to_string(&kw.policy_path).unwrap().replace(
        "\nservices:\n",
        "\nservices:\n  added:\n    hosts: [added.test]\n",
    );
    std::fs::write(&kw.policy_path, policy).unwrap();
    let (status, v) = kw.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{v}");
    let series = "keyward_upstream_errors_total{kind=\"tls\",service=\"added\"}";
    assert_eq!(kw.metric(series).await, Some(0.0));
    // (It injects no credential: nothing of it can be redacted.)
    let series = "keyward_secrets_redacted_total{service=\"added\"}";
    assert_eq!(kw.metric(series).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_have_the_spec_names_and_no_task_ids_paths_tokens_or_addresses() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint_with(json!({"agent": "bot", "task": "TICKET-HOSTILE-4242", "intent": ["plain.issues.read", "secure.read", "dead.ping"]}))
        .await;
    let agent = kw.agent(&task);
    let hostile = [
        f.plain_url("plain.test", "/echo?session=querysecret-zq9"),
        f.plain_url("plain.test", "/secret-path-zq9/evil"),
        format!("http://evil-host-zq9.test:{}/x", f.plain.port()),
        f.tls_url("secure.test", "/repos/acme/web/issues"),
        f.tls_url("secure.test", "/hidden-path-zq9"),
        format!("http://dead.test:{}/ping", f.dead_port),
    ];
    for url in hostile {
        let _ = kw.send(agent.get(url)).await;
    }
    let forged = common::Task {
        id: "FORGED-ID-zq9".into(),
        token: "kw_forged-token-zq9".into(),
    };
    let _ = kw
        .send(kw.agent(&forged).get(f.plain_url("plain.test", "/echo")))
        .await;
    kw.audit_count(7, |_| true).await;

    let text = kw.metrics().await;
    for (name, kind, allowed) in FAMILIES {
        assert!(
            text.contains(&format!("# TYPE {name} {kind}")),
            "no `# TYPE {name} {kind}` in:\n{text}"
        );
        for line in text.lines().filter(|l| l.starts_with(name)) {
            for label in label_names(line) {
                assert!(
                    allowed.contains(&label.as_str()),
                    "label `{label}` on {line}"
                );
            }
        }
    }
    for forbidden in [
        "TICKET-HOSTILE-4242",
        "FORGED-ID-zq9",
        "forged-token-zq9",
        "secret-path-zq9",
        "hidden-path-zq9",
        "querysecret-zq9",
        "evil-host-zq9",
        "127.0.0.1",
        "/echo",
        "/repos",
    ] {
        assert!(
            !text.contains(forbidden),
            "`{forbidden}` in /metrics:\n{text}"
        );
    }
    assert!(
        text.lines()
            .any(|l| l.starts_with("keyward_decisions_total{")
                && l.contains("reason=\"allowed\"")
                && l.contains("agent=\"bot\"")),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("keyward_decisions_total{")
                && l.contains("reason=\"invalid_token\"")
                && l.contains("agent=\"\"")),
        "an unauthenticated request has no agent label:\n{text}"
    );
    assert_eq!(
        common::metric_value(&text, "keyward_tasks_active{agent=\"bot\"}"),
        Some(1.0)
    );
    assert_eq!(
        common::metric_value(&text, "keyward_tls_leaf_certs_issued_total"),
        Some(1.0)
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_report_a_serving_keyward() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(kw.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let (status, v) = kw.admin_as(None, Method::GET, "/readyz", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["ready"], true, "{v}");
    assert!(v["policy_version"].as_str().is_some_and(|s| !s.is_empty()));
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_a_credential_cannot_be_read() {
    let mut setup = common::Setup::new();
    setup.secret_file("present", "sk_present_0123456789abcdef");
    let kw: Harness = setup
        .start(
            r#"
proxy: { listen: 127.0.0.1:0 }
admin: { listen: 127.0.0.1:0, token: file:admin-token }
ca: { cert: ca.pem, key: ca-key.pem }
audit: { path: audit.jsonl }
credentials:
  present: { source: file:present }
  missing: { source: file:missing }
services:
  a:
    hosts: [a.test]
    inject: { header: Authorization, value: "Bearer ${credential}", credential: present }
  b:
    hosts: [b.test]
    inject: { header: Authorization, value: "Bearer ${credential}", credential: missing }
capabilities:
  a.read: { service: a, risk: low, routes: [GET /x] }
  b.read: { service: b, risk: low, routes: [GET /x] }
agents:
  bot: { owner: tests, capabilities: [a.read, b.read], max_ttl: 1h }
"#,
        )
        .await;
    let (status, v) = kw.admin_as(None, Method::GET, "/readyz", None).await;
    assert_eq!(status, 503, "{v}");
    assert_eq!(v["ready"], false);
    assert_eq!(v["credentials_unreadable"], json!(["missing"]));
    // A reload of that policy is valid, and says what it cannot use yet (a `curl -f` of it
    // is no proof the pod serves).
    let (status, v) = kw.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["credentials_unreadable"], json!(["missing"]), "{v}");
    // Liveness does not depend on credentials.
    let resp = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(kw.admin_url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    // The credential appears: keyward notices the file and becomes ready.
    std::fs::write(kw.path("missing"), "sk_now_present_0123456789\n").unwrap();
    kw.add_secret("sk_now_present_0123456789");
    let mut ready = Value::Null;
    for _ in 0..150 {
        let (status, v) = kw.admin_as(None, Method::GET, "/readyz", None).await;
        if status == 200 {
            ready = v;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(ready["ready"], true, "never became ready");
    kw.assert_no_leaks().await;
}

/// An audit log that failed a write stays failed and keyward takes no request: liveness says
/// so, so that a supervisor restarts it (readiness alone would leave it refusing forever).
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_fails_once_the_audit_log_has_failed() {
    let setup = common::Setup::new();
    let kw: Harness = setup
        .start(
            r#"
proxy: { listen: 127.0.0.1:0 }
admin: { listen: 127.0.0.1:0, token: file:admin-token }
ca: { cert: ca.pem, key: ca-key.pem }
audit: { path: /dev/full }
services:
  a: { hosts: [a.test] }
capabilities:
  a.read: { service: a, risk: low, routes: [GET /x] }
agents:
  bot: { owner: tests, capabilities: [a.read], max_ttl: 1h }
"#,
        )
        .await;
    let healthz = || async {
        kw.http
            .get(kw.admin_url("/healthz"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(healthz().await, 200);
    // A request whose record cannot be written (no space left on /dev/full).
    let refused = common::raw_exchange(
        kw.proxy_addr,
        b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(refused.status, 407);
    let mut status = 0;
    for _ in 0..150 {
        status = healthz().await;
        if status == 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(status, 503, "liveness still ok after the audit log failed");
    let (ready, v) = kw.admin_as(None, Method::GET, "/readyz", None).await;
    assert_eq!(ready, 503, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_leaks_through_the_admin_api() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let (_, list) = kw.admin(Method::GET, "/v1/tasks", None).await;
    kw.saw(&list.to_string());
    let (_, one) = kw
        .admin(Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    kw.saw(&one.to_string());
    let (_, ready) = kw.admin(Method::GET, "/readyz", None).await;
    kw.saw(&ready.to_string());
    let (_, reload) = kw.admin(Method::POST, "/v1/reload", None).await;
    kw.saw(&reload.to_string());
    let (_, bad) = kw
        .mint_body(json!({"agent": "bot", "intent": ["plain.issues.read"], "ttl": "forever"}))
        .await;
    kw.saw(&bad.to_string());
    // The leak check reads keyward's log output too: make sure it is being captured.
    assert!(
        common::captured_logs().contains(&task.id),
        "keyward's log output is not captured"
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_listener_bounds_slow_heads_and_slow_bodies() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start_with(|p| {
        p.replace(
            "  listen: 127.0.0.1:0\nadmin:",
            "  listen: 127.0.0.1:0\n  header_read_timeout: 300ms\n  max_header_bytes: 4096\nadmin:",
        )
    })
    .await;
    let kw = &f.kw;

    // A head that never ends: the connection is closed, not held.
    let mut slow = tokio::net::TcpStream::connect(kw.admin_addr).await.unwrap();
    slow.write_all(b"GET /v1/tasks HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    common::bounded("slow head closed", slow.read_to_end(&mut buf))
        .await
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&buf).contains("\"tasks\""),
        "no admin content for an unfinished head"
    );

    // A mint body that stops short of its Content-Length: refused in bounded time, no task.
    let mut slow = tokio::net::TcpStream::connect(kw.admin_addr).await.unwrap();
    let head = format!(
        "POST /v1/tasks HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"agent\":",
        kw.admin_token
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    let resp = common::read_response(&mut slow).await;
    assert_eq!(resp.status, 408, "{}", resp.text());
    assert!(resp.text().contains("body_timeout"), "{}", resp.text());
    let (status, list) = kw.admin(Method::GET, "/v1/tasks", None).await;
    assert_eq!(status, 200);
    assert_eq!(list["tasks"].as_array().unwrap().len(), 0, "{list}");

    // A head over proxy.max_header_bytes (4 KiB here; the parser's own buffer holds 8 KiB) is
    // 431 with keyward's reason, as on the proxy listener, whatever the route; one just under
    // it is served.
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    for (size, status) in [(6_000, 431), (3_000, 200)] {
        let resp = client
            .get(kw.admin_url("/healthz"))
            .header("x-padding", "a".repeat(size))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "{size}-byte header");
        if status == 431 {
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["error"], "head_too_large", "{v}");
        }
    }
    kw.assert_no_leaks().await;
}

/// Log rotation: once the audit file is moved away, a reload (what logrotate's `postrotate`
/// sends as SIGHUP) makes keyward write to a new file at the configured path, starting its own
/// chain; the moved file stays complete and verifiable. A broken policy does not stop it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reopens_the_audit_file_for_log_rotation() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&task);
    let resp = kw.send(agent.get(f.plain_url("plain.test", "/echo"))).await;
    assert_eq!(resp.status, 200);
    kw.audit_count(1, |_| true).await;
    let rotated = kw.audit_path.with_extension("1");
    std::fs::rename(&kw.audit_path, &rotated).unwrap();
    // The policy file is broken at the moment of rotation: the reload fails, the reopen not.
    let policy = std::fs::read_to_string(&kw.policy_path).unwrap();
    std::fs::write(&kw.policy_path, "services: [").unwrap();
    let (status, _) = kw.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 400);
    std::fs::write(&kw.policy_path, policy).unwrap();
    let resp = kw.send(agent.get(f.plain_url("plain.test", "/echo"))).await;
    assert_eq!(resp.status, 200);
    let recs = kw.audit_count(1, |_| true).await;
    assert_eq!(
        recs[0]["seq"], 1,
        "a new file starts its own chain: {recs:?}"
    );
    assert_eq!(recs[0]["reason"], "allowed");
    let verify = |path: &std::path::Path| {
        let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
        keyward::audit::verify_chain(file).unwrap()
    };
    assert_eq!(verify(&rotated), 1);
    assert_eq!(verify(&kw.audit_path), 1);
}

/// An agent taken out of the policy, or a capability taken from an agent, loses its tasks for
/// good: they are revoked at the reload, and putting it back does not bring them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_without_an_agent_revokes_its_tasks_for_good() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("reader", json!(["plain.issues.read"])).await;
    let kept = kw.mint("bot", json!(["plain.issues.read"])).await;
    let ended = kw
        .mint_with(json!({"agent": "reader", "intent": ["plain.issues.read"], "ttl": "1s"}))
        .await;
    let url = f.plain_url("plain.test", "/echo");
    assert_eq!(kw.send(kw.agent(&task).get(&url)).await.status, 200);
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;

    let original = std::fs::read_to_string(&kw.policy_path).unwrap();
    let without = original.replacen(
        "  reader:\n    owner: tests\n    capabilities: [plain.issues.read]\n    max_ttl: 10m\n",
        "",
        1,
    );
    assert_ne!(without, original);
    std::fs::write(&kw.policy_path, &without).unwrap();
    let (status, v) = kw.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{v}");
    let (_, t) = kw
        .admin(Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(t["status"], "revoked", "{t}");
    // A task that had already expired stays expired, as with DELETE: it ended on its own.
    let (_, t) = kw
        .admin(Method::GET, &format!("/v1/tasks/{}", ended.id), None)
        .await;
    assert_eq!(t["status"], "expired", "{t}");

    std::fs::write(&kw.policy_path, &original).unwrap();
    let (status, v) = kw.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{v}");
    let resp = kw.send(kw.agent(&task).get(&url)).await;
    kw.assert_denied(&resp, 407, "task_revoked").await;
    let resp = kw.send(kw.agent(&ended).get(&url)).await;
    kw.assert_denied(&resp, 407, "task_expired").await;
    // Other agents' tasks are untouched.
    assert_eq!(kw.send(kw.agent(&kept).get(&url)).await.status, 200);

    // Likewise a capability the agent is no longer granted: withdrawn and restored, the
    // task minted before stays revoked.
    let narrowed = original.replacen(
        "capabilities: [plain.issues.read, plain.labels.write,",
        "capabilities: [plain.labels.write,",
        1,
    );
    assert_ne!(narrowed, original);
    std::fs::write(&kw.policy_path, &narrowed).unwrap();
    assert_eq!(kw.admin(Method::POST, "/v1/reload", None).await.0, 200);
    std::fs::write(&kw.policy_path, &original).unwrap();
    assert_eq!(kw.admin(Method::POST, "/v1/reload", None).await.0, 200);
    let resp = kw.send(kw.agent(&kept).get(&url)).await;
    kw.assert_denied(&resp, 407, "task_revoked").await;
    kw.assert_no_leaks().await;
}

/// An agent's `max_ttl` lowered by a reload bounds the tasks already minted too: one that
/// runs longer than the new limit allows is revoked (as a withdrawn capability's task is),
/// one within it goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_lowering_max_ttl_revokes_the_tasks_that_run_longer() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let long = kw
        .mint_with(json!({"agent": "reader", "intent": ["plain.issues.read"], "ttl": "10m"}))
        .await;
    let short = kw
        .mint_with(json!({"agent": "reader", "intent": ["plain.issues.read"], "ttl": "1m"}))
        .await;
    let url = f.plain_url("plain.test", "/echo");
    let original = std::fs::read_to_string(&kw.policy_path).unwrap();
    let lowered = original.replacen(
        "    capabilities: [plain.issues.read]\n    max_ttl: 10m\n",
        "    capabilities: [plain.issues.read]\n    max_ttl: 5m\n",
        1,
    );
    assert_ne!(lowered, original);
    std::fs::write(&kw.policy_path, &lowered).unwrap();
    let (status, v) = kw.admin(Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{v}");
    let resp = kw.send(kw.agent(&long).get(&url)).await;
    kw.assert_denied(&resp, 407, "task_revoked").await;
    assert_eq!(kw.send(kw.agent(&short).get(&url)).await.status, 200);
    kw.assert_no_leaks().await;
}

/// An admin token rotated at its source (a `file:` rewritten, as a Secret update does) applies
/// at the next reload, and the old one stops working; no restart, so no task is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_reads_the_admin_token_again() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let old = kw.admin_token.clone();
    let new = format!("adm_rotated_{}", keyward::tasks::random_hex(16));
    kw.add_secret(&new);
    std::fs::write(kw.path("admin-token"), format!("{new}\n")).unwrap();
    let (status, v) = kw
        .admin_as(Some(&old), Method::POST, "/v1/reload", None)
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = kw
        .admin_as(Some(&old), Method::GET, "/v1/tasks", None)
        .await;
    assert_eq!(status, 401, "the old admin token still works");
    let (status, v) = kw
        .admin_as(Some(&new), Method::GET, "/v1/tasks", None)
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(v.to_string().contains(&task.id), "the task survived: {v}");
    // Rotated again, with a policy that does not load: the new token applies, and an agent
    // holding it (or the one before) cannot send it out, whatever became of the reload.
    let newer = format!("adm_rotated_{}", keyward::tasks::random_hex(16));
    kw.add_secret(&newer);
    std::fs::write(kw.path("admin-token"), format!("{newer}\n")).unwrap();
    let policy = std::fs::read_to_string(&kw.policy_path).unwrap();
    std::fs::write(&kw.policy_path, format!("{policy}\nsurprise: true\n")).unwrap();
    let (status, v) = kw
        .admin_as(Some(&new), Method::POST, "/v1/reload", None)
        .await;
    assert_eq!(status, 400, "{v}");
    std::fs::write(&kw.policy_path, &policy).unwrap();
    let agent = kw.agent(&task);
    for token in [&newer, &new] {
        let resp = kw
            .send(
                agent
                    .get(f.plain_url("plain.test", "/echo"))
                    .header("x-note", token.as_str()),
            )
            .await;
        kw.assert_denied(&resp, 403, "secret_egress").await;
    }
    let (status, _) = kw
        .admin_as(Some(&newer), Method::GET, "/v1/tasks", None)
        .await;
    assert_eq!(status, 200);
    let new = newer;
    // A source that cannot be read keeps the current token.
    std::fs::remove_file(kw.path("admin-token")).unwrap();
    let (status, v) = kw
        .admin_as(Some(&new), Method::POST, "/v1/reload", None)
        .await;
    assert_eq!(status, 200, "{v}");
    let (status, _) = kw
        .admin_as(Some(&new), Method::GET, "/v1/tasks", None)
        .await;
    assert_eq!(status, 200);
    kw.assert_no_leaks().await;
}

/// DNS rebinding: a web page whose name an attacker points at 127.0.0.1 reaches the admin
/// listener as its own origin, but still names its own host. On a loopback connection only
/// loopback names are answered; the admin token is not what stops it, since `/metrics` and
/// `/readyz` need none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebound_page_cannot_read_the_admin_listener() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let port = kw.admin_addr.port();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &str, host: String| {
        let req = client
            .get(kw.admin_url(path))
            .header("host", host)
            .header("authorization", format!("Bearer {}", kw.admin_token));
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.text().await.unwrap())
        }
    };
    for path in ["/metrics", "/readyz", "/healthz", "/v1/tasks"] {
        for host in [
            format!("rebind.attacker.example:{port}"),
            format!("127.0.0.1.nip.io:{port}"),
            "attacker.example".to_string(),
        ] {
            let (status, body) = get(path, host.clone()).await;
            assert_eq!(status, 421, "{path} with Host {host}: {body}");
            assert!(body.contains("host_not_loopback"), "{body}");
            assert!(!body.contains("bot"), "{body}");
        }
        for host in [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            "localhost".to_string(),
        ] {
            let (status, body) = get(path, host.clone()).await;
            assert_eq!(status, 200, "{path} with Host {host}: {body}");
        }
        // An absolute-form target naming the page's host, with a loopback Host beside it.
        let raw = format!(
            "GET http://rebind.attacker.example:{port}{path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {}\r\nConnection: close\r\n\r\n",
            kw.admin_token
        );
        let mut tcp = tokio::net::TcpStream::connect(kw.admin_addr).await.unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut tcp, raw.as_bytes())
            .await
            .unwrap();
        let resp = common::read_response(&mut tcp).await;
        assert_eq!(resp.status, 421, "absolute-form {path}: {}", resp.text());
    }
    assert!(kw.metrics().await.contains("keyward_decisions_total"));
}

/// The same on a dual-stack wildcard listener (`[::]`), where a connection to 127.0.0.1
/// arrives on `::ffff:127.0.0.1`: still a loopback connection, still guarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebound_page_cannot_read_a_dual_stack_admin_listener() {
    let f = Fixture::start_with(|p| {
        p.replacen(
            "admin:\n  listen: 127.0.0.1:0",
            "admin:\n  listen: '[::]:0'",
            1,
        )
    })
    .await;
    let kw = &f.kw;
    assert!(kw.admin_addr.is_ipv6(), "{}", kw.admin_addr);
    let port = kw.admin_addr.port();
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    for (host, status) in [
        (format!("rebind.attacker.example:{port}"), 421),
        (format!("127.0.0.1:{port}"), 200),
        (format!("[::ffff:127.0.0.1]:{port}"), 200),
    ] {
        let resp = client
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .header("host", &host)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status, "Host {host}");
    }
}

/// Clients without the admin token cannot keep the operator out by holding every admin place
/// with kept-alive probes: with all 256 taken, the oldest of them makes room, and the
/// operator's revocation goes through at once. Connections that sent the token keep theirs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probes_holding_every_admin_place_make_room_for_the_operator() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let probe = "GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n";
    let with_token = |method: &str, path: &str| {
        format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {}\r\n\r\n",
            kw.admin_token
        )
    };
    // The operator's own kept-alive connection, known by its token.
    let mut operator = tokio::net::TcpStream::connect(kw.admin_addr).await.unwrap();
    operator
        .write_all(with_token("GET", "/v1/tasks").as_bytes())
        .await
        .unwrap();
    assert_eq!(common::read_response(&mut operator).await.status, 200);
    let mut probes = Vec::new();
    for _ in 0..255 {
        let mut tcp = tokio::net::TcpStream::connect(kw.admin_addr).await.unwrap();
        tcp.write_all(probe.as_bytes()).await.unwrap();
        assert_eq!(common::read_response(&mut tcp).await.status, 200);
        probes.push(tcp);
    }
    // Every place is taken. A new connection revoking the task is served at once.
    let started = std::time::Instant::now();
    let mut revoke = tokio::net::TcpStream::connect(kw.admin_addr).await.unwrap();
    revoke
        .write_all(with_token("DELETE", &format!("/v1/tasks/{}", task.id)).as_bytes())
        .await
        .unwrap();
    let resp = common::read_response(&mut revoke).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(started.elapsed() < std::time::Duration::from_secs(3));
    // The oldest probe made room; the operator's connection still works.
    let mut b = [0u8; 1];
    let closed = common::bounded("the oldest probe to close", probes[0].read(&mut b)).await;
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    operator
        .write_all(with_token("GET", "/v1/tasks").as_bytes())
        .await
        .unwrap();
    assert_eq!(common::read_response(&mut operator).await.status, 200);
}
