//! Connection lifecycle on the proxy listener: idle connections are closed after
//! `idle_timeout` while a streaming response is never cut, and a connection keeps its place
//! under `max_connections` for as long as the tunnel it became is open.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{bounded, connect_raw, read_response, Fixture, Harness, Task};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn keep_alive_get(f: &Fixture, path: &str, task: &Task) -> String {
    let port = f.plain.port();
    format!(
        "GET http://plain.test:{port}{path} HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\n\r\n",
        Harness::proxy_auth(task)
    )
}

/// The standard policy with `proxy.shutdown_timeout` set.
fn with_shutdown_timeout(policy: String, timeout: &str) -> String {
    policy.replace(
        "  listen: 127.0.0.1:0\nadmin:",
        &format!("  listen: 127.0.0.1:0\n  shutdown_timeout: {timeout}\nadmin:"),
    )
}

/// The standard fixture with `send_timeout: 1s` and one place in flight per task: whether a
/// stuck answer gives its place back shows at the task's next request.
async fn one_place_and_a_short_send_timeout() -> Fixture {
    Fixture::start_with(|p| {
        p.replace(
            "  listen: 127.0.0.1:0\nadmin:",
            "  listen: 127.0.0.1:0\n  send_timeout: 1s\n  max_task_in_flight: 1\nadmin:",
        )
    })
    .await
}

/// A passthrough tunnel to the TCP echo upstream, checked with one round trip.
async fn echo_tunnel(kw: &Harness, echo_port: u16, task: &Task) -> TcpStream {
    let target = format!("127.0.0.1:{echo_port}");
    let (mut tunnel, head) =
        connect_raw(kw.proxy_addr, &target, Some(&Harness::proxy_auth(task))).await;
    assert_eq!(head.status, 200);
    tunnel.write_all(b"ping").await.unwrap();
    let mut echo = [0u8; 4];
    bounded("tunnel echo", tunnel.read_exact(&mut echo))
        .await
        .unwrap();
    assert_eq!(&echo, b"ping");
    tunnel
}

/// Reads until the peer closes; panics (bounded) if it never does.
async fn expect_closed(tcp: &mut TcpStream, what: &str) {
    let mut buf = [0u8; 64];
    let n = bounded(what, tcp.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(
        n, 0,
        "{what}: expected the connection closed, read {n} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_keep_alive_connection_is_closed_but_a_quiet_stream_is_not_cut() {
    // header_read_timeout stays long, so only idle_timeout can close these connections.
    let f = Fixture::start_with(|p| {
        p.replace(
            "  listen: 127.0.0.1:0\nadmin:",
            "  listen: 127.0.0.1:0\n  idle_timeout: 300ms\n  header_read_timeout: 30s\nadmin:",
        )
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;

    // A keep-alive request, then silence: keyward closes the connection.
    let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
    tcp.write_all(keep_alive_get(&f, "/echo", &task).as_bytes())
        .await
        .unwrap();
    let resp = read_response(&mut tcp).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    expect_closed(&mut tcp, "idle keep-alive connection").await;

    // The SSE upstream pauses 200 ms between events, 400 ms in all: longer than idle_timeout,
    // yet the response is in flight, so every event arrives before the connection is closed.
    let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
    tcp.write_all(keep_alive_get(&f, "/sse", &task).as_bytes())
        .await
        .unwrap();
    let resp = read_response(&mut tcp).await;
    assert_eq!(resp.status, 200);
    let text = resp.text();
    for event in ["event 1", "event 2", "event 3"] {
        assert!(text.contains(event), "{event} missing from {text:?}");
    }
    expect_closed(&mut tcp, "connection idle after the stream").await;
    assert_eq!(f.plain.hits(), 2);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_tunnels_count_against_max_connections() {
    let f = Fixture::start_with(|p| {
        p.replace(
            "  listen: 127.0.0.1:0\nadmin:",
            "  listen: 127.0.0.1:0\n  max_connections: 1\nadmin:",
        )
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;

    // A passthrough tunnel takes the only connection slot while it is open...
    let tunnel = echo_tunnel(kw, f.tcp.addr.port(), &task).await;

    // ...so a second connection is not served until the tunnel closes.
    let mut second = TcpStream::connect(kw.proxy_addr).await.unwrap();
    second
        .write_all(keep_alive_get(&f, "/echo", &task).as_bytes())
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(
        std::time::Duration::from_millis(300),
        second.read(&mut byte),
    )
    .await;
    assert!(early.is_err(), "served past max_connections: {early:?}");
    assert_eq!(f.plain.hits(), 0);

    drop(tunnel);
    let resp = read_response(&mut second).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(f.plain.hits(), 1);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_at_its_in_flight_limit_does_not_starve_another() {
    let f = Fixture::start_with(|p| {
        p.replace(
            "  listen: 127.0.0.1:0\nadmin:",
            "  listen: 127.0.0.1:0\n  max_task_in_flight: 2\nadmin:",
        )
    })
    .await;
    let kw = &f.kw;
    let greedy = kw.mint("bot", json!(["plain.issues.read"])).await;
    let other = kw.mint("reader", json!(["plain.issues.read"])).await;
    let port = f.plain.port();

    // Two uploads that stop halfway hold both of the greedy task's places for as long as the
    // agent keeps them open (no timing involved).
    let mut uploads = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
        let head = format!(
            "POST http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\nContent-Length: 10\r\n\r\nhello",
            Harness::proxy_auth(&greedy)
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        uploads.push(tcp);
    }
    // Both are counted once keyward has decided them; poll (bounded) until the third is refused.
    let agent = kw.agent(&greedy);
    let mut refused = None;
    for _ in 0..100 {
        let resp = kw.send(agent.get(f.plain_url("plain.test", "/echo"))).await;
        if resp.status == 429 {
            refused = Some(resp);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let resp = refused.expect("the third request in flight was never refused");
    assert_eq!(resp.header("retry-after").as_deref(), Some("1"));
    let (body, _) = kw.assert_denied(&resp, 429, "budget_exhausted").await;
    assert!(
        body["detail"].as_str().unwrap().contains("in flight"),
        "{body}"
    );

    // Another task is served meanwhile.
    let resp = kw
        .send(kw.agent(&other).get(f.plain_url("plain.test", "/echo")))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);

    // Once the uploads finish, their answers come and the greedy task's places are back.
    for mut tcp in uploads {
        tcp.write_all(b"world").await.unwrap();
        let resp = read_response(&mut tcp).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert!(resp.text().contains("helloworld"), "{}", resp.text());
    }
    let resp = kw.send(agent.get(f.plain_url("plain.test", "/echo"))).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_requests_in_flight_finish_and_records_them() {
    let Fixture { mut kw, plain, .. } = Fixture::start().await;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = plain.port();
    let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
    tcp.write_all(
        format!(
            "GET http://plain.test:{port}/slow HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\n\r\n",
            Harness::proxy_auth(&task)
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // The upstream has the request (and answers 600 ms later): keyward is told to stop now.
    bounded("the upstream sees the request", async {
        while plain.hits() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    let client = async {
        let resp = read_response(&mut tcp).await;
        // Then the connection is closed (no keep-alive past shutdown).
        expect_closed(&mut tcp, "connection after the drained request").await;
        resp
    };
    let (resp, ()) = tokio::join!(client, kw.stop());
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.body, b"slow answer\n");
    // The request has its record in the flushed log.
    let rec = kw
        .audit_where("the drained request", |r| r["path"] == "/slow")
        .await;
    assert_eq!(rec["status"], 200);
    assert_eq!(rec["outcome"], "completed");
}

/// What the drain cannot finish is cut at its end (`proxy.shutdown_timeout`, 3 s here), and
/// still recorded: as cut by shutdown, not as the agent's hang-up, and before the audit log
/// closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_cuts_what_the_drain_cannot_finish_and_records_it() {
    let Fixture { mut kw, plain, .. } =
        Fixture::start_with(|p| with_shutdown_timeout(p, "3s")).await;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = plain.port();
    let request = |path: &str| {
        format!(
            "GET http://plain.test:{port}{path} HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\n\r\n",
            Harness::proxy_auth(&task)
        )
    };
    // One request waits on an upstream that answers after 30 s; another streams for 60 s.
    let mut stalled = TcpStream::connect(kw.proxy_addr).await.unwrap();
    stalled
        .write_all(request("/stall").as_bytes())
        .await
        .unwrap();
    let mut streaming = TcpStream::connect(kw.proxy_addr).await.unwrap();
    streaming
        .write_all(request("/endless").as_bytes())
        .await
        .unwrap();
    // A third one's agent gives up by itself during the drain.
    let mut quitter = TcpStream::connect(kw.proxy_addr).await.unwrap();
    quitter
        .write_all(request("/stall?quits").as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 256];
    let n = bounded("the stream's head", streaming.read(&mut first))
        .await
        .unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    bounded("the upstream sees the requests", async {
        while plain.hits() < 3 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;

    let started = std::time::Instant::now();
    let quits = async {
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
        drop(quitter);
    };
    tokio::join!(kw.stop(), quits);
    let took = started.elapsed();
    assert!(
        took >= std::time::Duration::from_millis(2900) && took < std::time::Duration::from_secs(7),
        "shutdown took {took:?}; the drain is 3 s"
    );
    let rec = kw
        .audit_where("the agent that gave up", |r| {
            r["path"] == "/stall" && r["outcome"] != "shutdown"
        })
        .await;
    assert_eq!(rec["outcome"], "client_closed", "{rec}");
    assert_eq!(rec["status"], 499);
    let rec = kw
        .audit_where("the stalled request", |r| {
            r["path"] == "/stall" && r["outcome"] == "shutdown"
        })
        .await;
    assert_eq!(rec["decision"], "allow");
    assert_eq!(rec["outcome"], "shutdown");
    assert_eq!(rec["status"], 503);
    let rec = kw
        .audit_where("the cut stream", |r| r["path"] == "/endless")
        .await;
    assert_eq!(rec["outcome"], "shutdown");
    assert_eq!(rec["status"], 200);
    assert!(rec["bytes_down"].as_u64().unwrap() > 0, "{rec}");
    // Both agents' connections are closed.
    expect_closed_after_data(&mut stalled).await;
    expect_closed_after_data(&mut streaming).await;
    // And the log says how many were cut, and where to look.
    let logs = common::captured_logs();
    assert!(
        logs.lines().any(|l| l.contains("WARN")
            && l.contains("the stop cut requests")
            && l.contains("cut=2")),
        "{logs}"
    );
}

/// Reads until the peer closes (whatever it sent before).
async fn expect_closed_after_data(tcp: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    bounded("the connection to close", async {
        while tcp.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_open_tunnels_and_records_them() {
    let Fixture { mut kw, tcp, .. } = Fixture::start().await;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let mut tunnel = echo_tunnel(&kw, tcp.addr.port(), &task).await;

    // An idle tunnel would otherwise hold shutdown for the whole drain (10 s) and then lose
    // its record with the runtime.
    let started = std::time::Instant::now();
    kw.stop().await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "shutdown waited {:?} for an idle tunnel",
        started.elapsed()
    );
    expect_closed(&mut tunnel, "the tunnel at shutdown").await;
    let rec = kw
        .audit_where("the tunnel", |r| r["method"] == "CONNECT")
        .await;
    assert_eq!(rec["reason"], "passthrough");
    assert_eq!(rec["outcome"], "shutdown");
    assert_eq!(rec["bytes_up"], 4);
    assert_eq!(rec["bytes_down"], 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_task_closes_its_tunnels_and_cuts_its_streams_at_once() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let other = kw.mint("bot", json!(["plain.issues.read"])).await;
    let mut tunnel = echo_tunnel(kw, f.tcp.addr.port(), &task).await;

    let mut others_tunnel = echo_tunnel(kw, f.tcp.addr.port(), &other).await;
    let mut stream = bounded(
        "the event stream",
        kw.agent(&task)
            .get(f.plain_url("plain.test", "/ticks"))
            .send(),
    )
    .await
    .unwrap();
    assert_eq!(stream.status(), 200);
    let first = bounded("the first event", stream.chunk()).await.unwrap();
    assert!(first.is_some_and(|c| c.starts_with(b"data: tick 1")));

    kw.revoke(&task.id).await;

    // The stream stops with an error, long before its 200 events (10 s)...
    let mut rest = Vec::new();
    let ended = bounded("the cut stream", async {
        loop {
            match stream.chunk().await {
                Ok(Some(chunk)) => rest.extend_from_slice(&chunk),
                Ok(None) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    })
    .await;
    assert!(ended.is_err(), "the stream ended as if complete");
    assert!(!String::from_utf8_lossy(&rest).contains("tick 200"));
    // ...a blind tunnel (which has no next request to refuse) is closed...
    expect_closed(&mut tunnel, "the revoked task's tunnel").await;
    // ...and both say why in their records. Another task's tunnel is untouched.
    let rec = kw
        .audit_where("the cut stream", |r| r["path"] == "/ticks")
        .await;
    assert_eq!(rec["outcome"], "task_revoked");
    let rec = kw
        .audit_where("the closed tunnel", |r| {
            r["method"] == "CONNECT" && r["task"] == task.id.as_str()
        })
        .await;
    assert_eq!(rec["outcome"], "task_revoked");
    others_tunnel.write_all(b"pong").await.unwrap();
    let mut echo = [0u8; 4];
    bounded("the other tunnel", others_tunnel.read_exact(&mut echo))
        .await
        .unwrap();
    assert_eq!(&echo, b"pong");
    kw.assert_no_leaks().await;
}

/// Upstream connections are pooled per service: sequential requests share one, a response
/// still streaming never holds up another request (it gets its own connection), and the
/// streaming one is reused once its body is done.
/// SPEC §9: a reload that takes a capability from an agent denies its tasks from then on, but
/// what they already have in flight finishes under the policy it started with. (An operator's
/// revocation, above, cuts it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_lets_a_withdrawn_tasks_requests_in_flight_finish() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("reader", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&task);
    let slow = tokio::spawn(agent.get(f.plain_url("plain.test", "/slow")).send());
    let mut stream = bounded(
        "the event stream",
        agent.get(f.plain_url("plain.test", "/sse")).send(),
    )
    .await
    .unwrap();
    let first = bounded("the first event", stream.chunk()).await.unwrap();
    assert!(first.is_some_and(|c| c.starts_with(b"data: event 1")));

    let original = std::fs::read_to_string(&kw.policy_path).unwrap();
    let without = original.replacen(
        "  reader:\n    owner: tests\n    capabilities: [plain.issues.read]\n    max_ttl: 10m\n",
        "",
        1,
    );
    assert_ne!(without, original);
    std::fs::write(&kw.policy_path, &without).unwrap();
    let (status, v) = kw.admin(http::Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{v}");

    // Both requests sent before the reload complete, whole...
    let mut rest = Vec::new();
    while let Some(chunk) = bounded("the rest of the stream", stream.chunk())
        .await
        .unwrap()
    {
        rest.extend_from_slice(&chunk);
    }
    assert!(String::from_utf8_lossy(&rest).contains("data: event 3"));
    let slow = bounded("the slow answer", slow).await.unwrap().unwrap();
    assert_eq!(slow.status(), 200);
    assert_eq!(slow.text().await.unwrap(), "slow answer\n");
    for path in ["/sse", "/slow"] {
        let rec = kw
            .audit_where("the finished request", |r| r["path"] == path)
            .await;
        assert_eq!(rec["status"], 200, "{rec}");
        assert_ne!(rec["outcome"], "task_revoked", "{rec}");
    }
    // ...and the next one is refused.
    let resp = kw.send(agent.get(f.plain_url("plain.test", "/echo"))).await;
    kw.assert_denied(&resp, 407, "task_revoked").await;
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connections_are_reused_and_a_stream_holds_up_no_one() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let agent = kw.agent(&task);
    for _ in 0..10 {
        let resp = kw.send(agent.get(f.plain_url("plain.test", "/echo"))).await;
        assert_eq!(resp.status, 200);
    }
    assert_eq!(
        f.plain.connections(),
        1,
        "sequential requests share a connection"
    );

    // A 10 s stream on a second agent connection...
    let mut stream = TcpStream::connect(kw.proxy_addr).await.unwrap();
    stream
        .write_all(keep_alive_get(&f, "/ticks", &task).as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 64];
    let n = bounded("first tick", stream.read(&mut first))
        .await
        .unwrap();
    assert!(n > 0);
    // ...while other requests go through at once.
    for _ in 0..5 {
        let resp = bounded(
            "a request beside the stream",
            kw.send(agent.get(f.plain_url("plain.test", "/echo"))),
        )
        .await;
        assert_eq!(resp.status, 200);
    }
    assert_eq!(
        f.plain.connections(),
        2,
        "the stream has its own connection"
    );
    drop(stream);
}

/// An HTTP/2 upstream connection carries one task's requests only: shared, one task's agent
/// could stall the others (unread downloads holding its window, streams its concurrency
/// limit, cancelled streams its patience); each task's requests still share its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_task_gets_its_own_http2_upstream_connection() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let url = f.tls_url("secure.test", "/echo");
    for round in 1..=2 {
        let task = kw.mint("bot", json!(["secure.read"])).await;
        let agent = kw.agent(&task);
        for _ in 0..3 {
            let resp = kw.send(agent.get(&url)).await;
            assert_eq!(resp.status, 200, "{}", resp.body);
        }
        assert_eq!(
            f.tls.connections(),
            round,
            "one upstream connection per task"
        );
    }
    assert_eq!(
        f.tls.last().version,
        "HTTP/2.0",
        "the upstream was reached over HTTP/2"
    );
    // A new task's first requests, sent at once, wait for one dial rather than each dialling.
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let agent = kw.agent(&task);
    let burst = (0..8).map(|_| kw.send(agent.get(&url)));
    for resp in futures_util::future::join_all(burst).await {
        assert_eq!(resp.status, 200, "{}", resp.body);
    }
    assert_eq!(f.tls.connections(), 3, "a burst dialled more than once");
}

/// An upstream that answers one keep-alive request per connection (without `Connection:
/// close`), then closes it `close_after` later without reading anything more; and a fixture
/// whose `basic` service points at it. Returns the fixture, the count of requests answered,
/// and the server (abort it at the end).
async fn closing_upstream(
    close_after: std::time::Duration,
) -> (
    Fixture,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    tokio::task::JoinHandle<()>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = served.clone();
    let server = tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = listener.accept().await else {
                continue;
            };
            let counter = counter.clone();
            tokio::spawn(async move {
                if !common::read_request_head(&mut tcp).await {
                    return;
                }
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = tcp
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                tokio::time::sleep(close_after).await;
            });
        }
    });
    let f = Fixture::start_with(move |p| {
        let at = p.find("hosts: [basic.test]").unwrap();
        let from = at + p[at..].find("connect_to: 127.0.0.1:").unwrap();
        let to = from + p[from..].find('\n').unwrap();
        format!("{}connect_to: 127.0.0.1:{port}{}", &p[..from], &p[to..])
    })
    .await;
    (f, served, server)
}

/// A pooled connection the upstream closed while idle is not reported as a failure: the
/// request, never written to it, goes out on a new connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_the_upstream_closed_is_replaced() {
    let (f, served, server) = closing_upstream(std::time::Duration::from_millis(50)).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["basic.whoami"])).await;
    let agent = kw.agent(&task);
    for i in 0..6 {
        let resp = kw
            .send(agent.get(format!("http://basic.test:{}/whoami", f.plain.port())))
            .await;
        assert_eq!(resp.status, 200, "request {i}: {}", resp.body);
        // Let the upstream close the connection keyward just pooled.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 6);
    server.abort();
}

/// The keep-alive race: the upstream closes a connection (without `Connection: close` on its
/// answer) just as keyward sends the next request on it. A bodyless GET is sent again on a
/// new connection instead of answering 502 (unsafe methods and bodies never are: see
/// `upstream::replayable`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_caught_by_the_keep_alive_race_is_sent_again() {
    // Closed 100 ms after each answer, unread: the next request is already on it by then.
    let (f, served, server) = closing_upstream(std::time::Duration::from_millis(100)).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["basic.whoami"])).await;
    let agent = kw.agent(&task);
    let url = format!("http://basic.test:{}/whoami", f.plain.port());
    for i in 0..4 {
        let resp = kw.send(agent.get(&url)).await;
        // Each next request goes out at once on the pooled connection, which the upstream
        // then closes unanswered.
        assert_eq!(resp.status, 200, "request {i}: {}", resp.body);
    }
    assert_eq!(served.load(std::sync::atomic::Ordering::SeqCst), 4);
    server.abort();
}

/// One HTTP/2 upstream connection carries all of a service's requests: agents that stop
/// reading large downloads must not use up its flow-control window and stall everyone else's
/// answers (with hyper's default windows, three such readers did).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_readers_do_not_stall_a_services_http2_connection() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let port = f.tls.port();
    let mut stalled = Vec::new();
    for _ in 0..6 {
        let mut tls = common::tunnel_tls(&f, &task, "secure.test", &[b"http/1.1"]).await;
        let req = format!("GET /big HTTP/1.1\r\nHost: secure.test:{port}\r\n\r\n");
        tls.write_all(req.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        let mut first = [0u8; 1024];
        bounded("first bytes of /big", tls.read(&mut first))
            .await
            .unwrap();
        stalled.push(tls); // and never read again
    }
    // Let the stalled streams fill every buffer on the way.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let mut tls = common::tunnel_tls(&f, &task, "secure.test", &[b"http/1.1"]).await;
    let req = format!(
        "GET /repos/acme/web/issues HTTP/1.1\r\nHost: secure.test:{port}\r\nConnection: close\r\n\r\n"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    let mut answer = Vec::new();
    let done = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tls.read_to_end(&mut answer),
    )
    .await;
    assert!(
        done.is_ok(),
        "another agent's answer stalled behind readers that stopped reading"
    );
    let resp = common::parse_response(&answer);
    assert_eq!(resp.status, 200);
    assert!(
        resp.text().contains("/repos/acme/web/issues"),
        "{}",
        resp.text()
    );
    drop(stalled);
}

/// A blind tunnel holds one of its task's places in flight while it is open (one task cannot
/// hold every connection with idle tunnels), and one with nothing crossing for the idle
/// timeout is closed and recorded as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blind_tunnels_count_against_the_task_and_close_when_idle() {
    let Fixture { mut kw, tcp, .. } = Fixture::start_with(|p| {
        p.replace(
            "  listen: 127.0.0.1:0\nadmin:",
            "  listen: 127.0.0.1:0\n  max_task_in_flight: 2\n  idle_timeout: 1s\nadmin:",
        )
    })
    .await;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let other = kw.mint("bot", json!(["plain.issues.read"])).await;
    let target = format!("127.0.0.1:{}", tcp.addr.port());
    let auth = Harness::proxy_auth(&task);

    let mut first = echo_tunnel(&kw, tcp.addr.port(), &task).await;
    let _second = echo_tunnel(&kw, tcp.addr.port(), &task).await;
    let (_, third) = connect_raw(kw.proxy_addr, &target, Some(&auth)).await;
    assert_eq!(third.status, 429, "{}", third.text());
    assert_eq!(
        third.header("x-keyward-reason").as_deref(),
        Some("budget_exhausted")
    );
    // Another task is not held up by this one's tunnels.
    let _others = echo_tunnel(&kw, tcp.addr.port(), &other).await;

    // Kept busy, a tunnel stays open past the idle timeout...
    for _ in 0..6 {
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        first.write_all(b"ping").await.unwrap();
        let mut echo = [0u8; 4];
        bounded("busy tunnel echo", first.read_exact(&mut echo))
            .await
            .unwrap();
    }
    // ...and quiet, it is closed within two of it, which gives its place back.
    let started = std::time::Instant::now();
    expect_closed(&mut first, "the idle tunnel").await;
    assert!(started.elapsed() < std::time::Duration::from_millis(2500));
    let _again = bounded("a place once the idle tunnels closed", async {
        loop {
            let (tunnel, head) = connect_raw(kw.proxy_addr, &target, Some(&auth)).await;
            if head.status == 200 {
                break tunnel;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    })
    .await;
    kw.stop().await;
    // The first tunnel's record: seven pings up, closed as idle (so was the second).
    let rec = kw
        .audit_where("the idle tunnel", |r| r["bytes_up"] == 4 * 7)
        .await;
    assert_eq!(rec["reason"], "passthrough");
    assert_eq!(rec["outcome"], "idle");
}

/// Inside an intercepted tunnel, a client that finishes the TLS handshake and then sends
/// nothing is closed after `header_read_timeout`, as on the plain listener (it was held until
/// the idle timeout), over HTTP/1.1 and HTTP/2 alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_silent_after_its_handshake_is_closed_at_the_head_timeout() {
    let f = Fixture::start_with(|p| {
        p.replace(
            "  listen: 127.0.0.1:0\nadmin:",
            "  listen: 127.0.0.1:0\n  header_read_timeout: 1s\nadmin:",
        )
    })
    .await;
    let task = f.kw.mint("bot", json!(["secure.read"])).await;
    for alpn in [&b"http/1.1"[..], &b"h2"[..]] {
        let mut tls = common::tunnel_tls(&f, &task, "secure.test", &[alpn]).await;
        let started = std::time::Instant::now();
        let mut buf = [0u8; 256];
        bounded("the silent tunnel to close", async {
            while tls.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        })
        .await;
        let took = started.elapsed();
        assert!(
            took < std::time::Duration::from_secs(3),
            "{}: closed after {took:?}",
            String::from_utf8_lossy(alpn)
        );
    }
    // A client that asks in time is served as before.
    let agent = f.kw.agent(&task);
    let resp =
        f.kw.send(agent.get(f.tls_url("secure.test", "/echo")))
            .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
}

/// An HTTP/2 agent's responses stream from tasks of their own, outside the connection's: at
/// the drain's end they are cut and recorded like HTTP/1's, and the tunnel's own record is
/// written too, all before the audit log closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_records_the_http2_streams_it_cuts_and_their_tunnel() {
    use http_body_util::BodyExt;
    let mut f = Fixture::start_with(|p| with_shutdown_timeout(p, "1s")).await;
    let task = f.kw.mint("bot", json!(["secure.read"])).await;
    let mut h2 = common::tunnel_h2(&f, &task, "secure.test").await;
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let req = http::Request::builder()
            .uri(format!("https://secure.test:{}/endless", f.tls.port()))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        bounded("h2 ready", h2.ready()).await.unwrap();
        let resp = bounded("the stream's head", h2.send_request(req))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let first = bounded("the first tick", body.frame()).await;
        assert!(first.is_some_and(|f| f.is_ok()));
        bodies.push(body);
    }
    f.kw.stop().await;
    let records = f.kw.audit_records();
    let streams: Vec<_> = records.iter().filter(|r| r["path"] == "/endless").collect();
    assert_eq!(streams.len(), 2, "{records:?}");
    for rec in streams {
        assert_eq!(rec["outcome"], "shutdown", "{rec}");
        assert_eq!(rec["status"], 200);
        assert!(rec["bytes_down"].as_u64().unwrap() > 0, "{rec}");
    }
    let tunnels: Vec<_> = records
        .iter()
        .filter(|r| r["method"] == "CONNECT")
        .collect();
    assert_eq!(tunnels.len(), 1, "{records:?}");
    assert_eq!(tunnels[0]["reason"], "allowed");
}

/// A client that has sent part of a head has no request in flight: the stop closes it at
/// once, as it closes a silent one, and does not wait out the drain for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_does_not_wait_for_a_head_still_arriving() {
    let mut f = Fixture::start_with(|p| with_shutdown_timeout(p, "5s")).await;
    let mut tcp = TcpStream::connect(f.kw.proxy_addr).await.unwrap();
    tcp.write_all(b"GET http://plain.test/").await.unwrap();
    // (Time for keyward to read the first bytes and begin parsing.)
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let started = std::time::Instant::now();
    f.kw.stop().await;
    let took = started.elapsed();
    assert!(
        took < std::time::Duration::from_secs(3),
        "the stop took {took:?}; the drain is 5 s"
    );
    let mut rest = Vec::new();
    let _ = bounded("closed", tcp.read_to_end(&mut rest)).await;
}

/// An HTTP/2 upload still arriving when the drain ends is cut by keyward, and recorded so
/// (`shutdown`, 503), not as an agent that hung up: the stream's body breaks when its
/// connection is cut, which read as a hang-up in about half the runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_records_the_http2_uploads_it_cuts_as_shutdown() {
    use futures_util::StreamExt;
    let mut f = Fixture::start_with(|p| {
        let p = with_shutdown_timeout(p, "300ms");
        common::extend_policy(
            &p,
            "",
            "  secure.upload:\n    service: secure\n    risk: low\n    routes: [POST /upload]\n",
            "  uploader:\n    owner: tests\n    capabilities: [secure.upload]\n    max_ttl: 1h\n",
        )
    })
    .await;
    let task = f.kw.mint("uploader", json!(["secure.upload"])).await;
    let tls = common::tunnel_tls(&f, &task, "secure.test", &[b"h2"]).await;
    type Upload = http_body_util::combinators::BoxBody<bytes::Bytes, std::convert::Infallible>;
    let (mut h2, conn) = bounded(
        "h2 handshake",
        hyper::client::conn::http2::handshake::<_, _, Upload>(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(tls),
        ),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let mut responses = Vec::new();
    for _ in 0..4 {
        // One frame of the body, then nothing more: the upload is still arriving.
        let first = futures_util::stream::iter([Ok::<_, std::convert::Infallible>(
            http_body::Frame::data(bytes::Bytes::from_static(b"partial")),
        )]);
        let body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
            first.chain(futures_util::stream::pending()),
        ));
        let req = http::Request::builder()
            .method("POST")
            .uri(format!("https://secure.test:{}/upload", f.tls.port()))
            .body(body)
            .unwrap();
        bounded("h2 ready", h2.ready()).await.unwrap();
        responses.push(tokio::spawn(h2.send_request(req)));
    }
    // (The upstream counts a request once it has read its body: give the heads time to go.)
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    f.kw.stop().await;
    for response in responses {
        response.abort();
    }
    let records = f.kw.audit_records();
    let uploads: Vec<_> = records.iter().filter(|r| r["path"] == "/upload").collect();
    assert_eq!(uploads.len(), 4, "{records:?}");
    for rec in uploads {
        assert_eq!(rec["outcome"], "shutdown", "{rec}");
        assert_eq!(rec["status"], 503, "{rec}");
    }
}

/// An idle HTTP/2 connection (nothing in flight) closes at once at shutdown, like an idle
/// HTTP/1 one: HTTP/2's graceful close waits for the client to answer a PING, which a stuck
/// client never does, and that held shutdown for the whole drain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_an_idle_http2_connection_at_once() {
    let mut f = Fixture::start().await;
    let task = f.kw.mint("bot", json!(["secure.read"])).await;
    let tls = common::tunnel_tls(&f, &task, "secure.test", &[b"h2"]).await;
    let (mut client, mut conn) = bounded("h2 handshake", h2::client::handshake(tls))
        .await
        .unwrap();
    let req = http::Request::builder()
        .uri(f.tls_url("secure.test", "/echo"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = bounded("the response", async {
        tokio::select! {
            r = resp => r,
            _ = &mut conn => panic!("connection ended"),
        }
    })
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    bounded("the body", async {
        loop {
            tokio::select! {
                chunk = body.data() => if chunk.is_none() { return },
                _ = &mut conn => panic!("connection ended"),
            }
        }
    })
    .await;
    // From here on `conn` is held but never polled: keyward's PING goes unanswered.
    let started = std::time::Instant::now();
    f.kw.stop().await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "shutdown waited {:?} for an idle HTTP/2 connection",
        started.elapsed()
    );
    drop((client, conn));
}

/// A tunnel whose agent never starts its TLS handshake has nothing in flight: shutdown closes
/// it at once and records it (`shutdown`), even with a drain shorter than the handshake's own
/// timeout (which used to outlast it and lose the record).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_records_a_tunnel_still_waiting_for_its_handshake() {
    let mut f = Fixture::start_with(|p| with_shutdown_timeout(p, "1s")).await;
    let task = f.kw.mint("bot", json!(["secure.read"])).await;
    let authority = format!("secure.test:{}", f.tls.port());
    let (mut silent, head) = connect_raw(
        f.kw.proxy_addr,
        &authority,
        Some(&Harness::proxy_auth(&task)),
    )
    .await;
    assert_eq!(head.status, 200);
    let started = std::time::Instant::now();
    f.kw.stop().await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(3),
        "shutdown took {:?}",
        started.elapsed()
    );
    expect_closed(&mut silent, "the silent tunnel").await;
    let rec =
        f.kw.audit_where("the tunnel", |r| r["method"] == "CONNECT")
            .await;
    assert_eq!(rec["outcome"], "shutdown", "{rec}");
}

/// An agent that stops reading its answer is disconnected once it has taken no byte for
/// `send_timeout`: the request ends (recorded, `client_closed`) and gives back its task's
/// place in flight, instead of holding it, and the upstream connection, for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_stops_reading_is_disconnected_after_send_timeout() {
    let f = one_place_and_a_short_send_timeout().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
    tcp.write_all(keep_alive_get(&f, "/big", &task).as_bytes())
        .await
        .unwrap();
    let mut first = [0u8; 1024];
    bounded("first bytes of /big", tcp.read(&mut first))
        .await
        .unwrap();
    // And never read again (64 MiB is more than the socket buffers on the way hold).
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let rec = kw
        .audit_where("the unread /big", |r| r["path"] == "/big")
        .await;
    assert_eq!(rec["outcome"], "client_closed", "{rec}");
    assert_eq!(rec["status"], 200, "{rec}");
    let down = rec["bytes_down"].as_u64().unwrap();
    assert!(down < 64 << 20, "all of /big was sent: {rec}");

    // The task's one place in flight is free again.
    let resp = kw
        .send(kw.agent(&task).get(f.plain_url("plain.test", "/echo")))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    drop(tcp);

    // The same inside an intercepted tunnel: TLS to the agent writes through the deadline.
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut tls = common::tunnel_tls(&f, &task, "secure.test", &[b"http/1.1"]).await;
    let port = f.tls.port();
    let req = format!("GET /big HTTP/1.1\r\nHost: secure.test:{port}\r\n\r\n");
    tls.write_all(req.as_bytes()).await.unwrap();
    tls.flush().await.unwrap();
    bounded("first bytes of /big", tls.read(&mut first))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    let rec = kw
        .audit_where("the unread /big in a tunnel", |r| {
            r["path"] == "/big" && r["host"] == "secure.test"
        })
        .await;
    assert_eq!(rec["outcome"], "client_closed", "{rec}");
    let resp = kw
        .send(kw.agent(&task).get(f.tls_url("secure.test", "/echo")))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    drop(tls);
    kw.assert_no_leaks().await;
}

/// A blind tunnel is an open channel, not a request that finishes under the policy it started
/// with: a reload that takes its host off `passthrough` closes it (outcome `policy_changed`),
/// while a reload that keeps the host leaves it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_takes_a_host_off_passthrough_closes_its_tunnels() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let mut tunnel = echo_tunnel(kw, f.tcp.addr.port(), &task).await;
    let reload = || async {
        let (status, v) = kw.admin(http::Method::POST, "/v1/reload", None).await;
        assert_eq!(status, 200, "{v}");
    };
    // The same policy again: the tunnel carries on.
    reload().await;
    tunnel.write_all(b"pong").await.unwrap();
    let mut echo = [0u8; 4];
    bounded("the tunnel after a reload", tunnel.read_exact(&mut echo))
        .await
        .unwrap();
    assert_eq!(&echo, b"pong");
    // Without the host: closed, and its record says why. The task itself stays active.
    let original = std::fs::read_to_string(&kw.policy_path).unwrap();
    let without = original.replacen("passthrough: [127.0.0.1]\n", "", 1);
    assert_ne!(without, original);
    std::fs::write(&kw.policy_path, &without).unwrap();
    reload().await;
    expect_closed(&mut tunnel, "the tunnel to a host no longer passthrough").await;
    let rec = kw
        .audit_where("the closed tunnel", |r| r["method"] == "CONNECT")
        .await;
    assert_eq!(rec["outcome"], "policy_changed", "{rec}");
    assert_eq!(rec["bytes_up"], 8, "{rec}");
    let (_, t) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(t["status"], "active", "{t}");
}

/// HTTP/2 flow control is per stream: an agent that reads its connection but never opens one
/// stream's window gets that stream reset once `send_timeout` passes with its answer waiting,
/// the request is recorded `client_closed`, and the task's place in flight is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_stream_whose_window_stays_shut_is_reset_after_send_timeout() {
    let f = one_place_and_a_short_send_timeout().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let tls = common::tunnel_tls(&f, &task, "secure.test", &[b"h2"]).await;
    let (mut h2, conn) = bounded(
        "h2 handshake",
        h2::client::Builder::new()
            .initial_window_size(0)
            .handshake::<_, bytes::Bytes>(tls),
    )
    .await
    .unwrap();
    // The connection is driven (its window open): only the stream's stays shut.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .uri(f.tls_url("secure.test", "/big"))
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    let started = std::time::Instant::now();
    let mut body = bounded("the head", resp).await.unwrap().into_body();
    let ended = bounded("the reset", body.data()).await;
    assert!(
        !matches!(ended, Some(Ok(_))),
        "data came through a shut window: {ended:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= std::time::Duration::from_millis(900),
        "{waited:?}"
    );
    let rec = kw
        .audit_where("the unsent /big", |r| r["path"] == "/big")
        .await;
    assert_eq!(rec["outcome"], "client_closed", "{rec}");
    // (What was handed to the HTTP/2 layer counts, though the shut window kept it there.)
    assert!(rec["bytes_down"].as_u64().unwrap() < 1 << 20, "{rec}");
    // The task's one place in flight is free again.
    let resp = kw
        .send(kw.agent(&task).get(f.tls_url("secure.test", "/echo")))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
}
