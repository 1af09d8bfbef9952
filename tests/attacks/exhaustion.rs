//! Exhaustion (I7): slowloris on request heads, on the TLS handshake and inside a tunnel; slow
//! bodies, silent upstreams and stalled upstream handshakes (bounded by `upstream_timeout` and
//! `connect_timeout`); HTTP/2 rapid reset and CONTINUATION floods (the connection is cut, the
//! process keeps serving); the connection cap; per-task fairness: one task's slow requests are
//! capped by `max_task_in_flight` while another task is served, and its stalled connections
//! hold the listener no longer than the head timeout.
//!
//! A connection is bound to a task at its first authenticated head, and one task holds at most
//! `max_task_connections`; before that, the head and handshake timeouts bound how long a
//! connection holds a place under `max_connections`.

use std::time::{Duration, Instant};

use serde_json::json;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::{bounded, connect_raw, read_response, Fixture, Harness, Reply, ScriptUpstream};
use crate::headers::{raw_req, raw_req_at, tunnel_tls};

/// The standard policy with `settings` (YAML lines under `proxy:`) added.
fn with_proxy(policy: String, settings: &str) -> String {
    policy.replacen(
        "proxy:\n  listen: 127.0.0.1:0\n",
        &format!("proxy:\n  listen: 127.0.0.1:0\n{settings}"),
        1,
    )
}

/// A raw kept-alive `METHOD /echo` on the plain upstream for `task`.
fn kept_alive(f: &Fixture, method: &str, task: &crate::common::Task) -> String {
    raw_req(f, method, "plain.test", "/echo", task, "").replace("Connection: close\r\n", "")
}

/// Waits (bounded) until the peer closes `io`, feeding it one byte of `drip` every 50 ms
/// (slowloris) while it stays open. Returns how long it took.
async fn closed_within<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    drip: &[u8],
    limit: Duration,
) -> Duration {
    let start = Instant::now();
    let mut i = 0;
    loop {
        let mut b = [0u8; 512];
        match tokio::time::timeout(Duration::from_millis(50), io.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return start.elapsed(),
            // An answer (408, 400) before the close is fine; keep reading to the close.
            Ok(Ok(_)) => continue,
            Err(_) => {}
        }
        assert!(
            start.elapsed() < limit,
            "the connection is still open after {:?}",
            start.elapsed()
        );
        if let Some(byte) = drip.get(i) {
            if io.write_all(&[*byte]).await.is_err() || io.flush().await.is_err() {
                return start.elapsed();
            }
            i += 1;
        }
    }
}

/// A fresh agent request still gets through (the process keeps serving).
async fn still_serving(f: &Fixture) {
    let task = f.kw.mint("bot", json!(["plain.issues.read"])).await;
    let resp =
        f.kw.raw(&raw_req(f, "GET", "plain.test", "/echo", &task, ""))
            .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_request_heads_are_cut_at_the_header_read_timeout() {
    let f = Fixture::start_with(|p| with_proxy(p, "  header_read_timeout: 300ms\n")).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let head = raw_req(&f, "GET", "plain.test", "/echo", &task, "");
    // Dripping the head one byte at a time, and sending nothing at all.
    for drip in [head.as_bytes(), b"".as_slice()] {
        let mut tcp = bounded("connect", TcpStream::connect(kw.proxy_addr))
            .await
            .unwrap();
        let took = closed_within(&mut tcp, drip, Duration::from_secs(3)).await;
        assert!(
            took >= Duration::from_millis(200),
            "closed too early: {took:?}"
        );
    }
    // A kept-alive connection that goes quiet after one request is cut too.
    let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
    let keep = head.replace("Connection: close\r\n", "");
    tcp.write_all(keep.as_bytes()).await.unwrap();
    let first = crate::common::read_response(&mut tcp).await;
    assert_eq!(first.status, 200);
    closed_within(&mut tcp, b"GET http://plain.test", Duration::from_secs(3)).await;
    assert_eq!(f.plain.hits(), 1);
    still_serving(&f).await;
    kw.assert_no_leaks().await;
}

/// A head's time counts from the connection's start, not from its first byte: a client silent
/// for most of `header_read_timeout` does not get a second one by then dripping its head.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_begun_late_is_cut_at_the_header_read_timeout_after_connecting() {
    let f = Fixture::start_with(|p| with_proxy(p, "  header_read_timeout: 1s\n")).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let head = raw_req(&f, "GET", "plain.test", "/echo", &task, "");
    let mut tcp = bounded("connect", TcpStream::connect(kw.proxy_addr))
        .await
        .unwrap();
    let connected = Instant::now();
    tokio::time::sleep(Duration::from_millis(800)).await;
    closed_within(&mut tcp, head.as_bytes(), Duration::from_secs(4)).await;
    let took = connected.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "closed {took:?} after connecting"
    );
    assert_eq!(f.plain.hits(), 0);
    still_serving(&f).await;
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_tls_handshake_is_cut_and_recorded() {
    let f = Fixture::start_with(|p| with_proxy(p, "  header_read_timeout: 300ms\n")).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let authority = format!("secure.test:{}", f.tls.port());
    let auth = Harness::proxy_auth(&task);
    // Nothing after the 200, then a ClientHello's first bytes dripped and never finished.
    let partial_hello: &[u8] = &[
        0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
    ];
    for drip in [b"".as_slice(), partial_hello] {
        let (mut tcp, head) = connect_raw(kw.proxy_addr, &authority, Some(&auth)).await;
        assert_eq!(head.status, 200);
        let took = closed_within(&mut tcp, drip, Duration::from_secs(3)).await;
        assert!(took < Duration::from_secs(2), "{took:?}");
    }
    let recs = kw
        .audit_count(2, |r| {
            r["method"] == "CONNECT" && r["outcome"] == "tls_handshake_failed"
        })
        .await;
    assert_eq!(recs.len(), 2);
    for r in &recs {
        crate::common::assert_record(r);
        assert_eq!(r["task"], task.id.as_str());
    }
    assert_eq!(f.tls.hits(), 0);
    still_serving(&f).await;
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_head_inside_an_intercepted_tunnel_is_cut() {
    let f = Fixture::start_with(|p| with_proxy(p, "  header_read_timeout: 300ms\n")).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut tls = tunnel_tls(&f, &task, "secure.test", &[b"http/1.1"]).await;
    let head = format!(
        "GET /echo HTTP/1.1\r\nHost: secure.test:{}\r\n\r\n",
        f.tls.port()
    );
    let took = closed_within(&mut tls, head.as_bytes(), Duration::from_secs(3)).await;
    assert!(took < Duration::from_secs(2), "{took:?}");
    assert_eq!(f.tls.hits(), 0);
    // The tunnel's record is written when it closes.
    kw.audit_where("tunnel closed", |r| {
        r["method"] == "CONNECT" && r["task"] == task.id.as_str() && r["outcome"] == "closed"
    })
    .await;
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_request_body_and_silent_upstream_are_bounded_by_the_upstream_timeout() {
    let script = ScriptUpstream::start(|_| Reply::hang()).await;
    let port = script.port();
    let f = Fixture::start_with(|p| {
        with_proxy(
            p.replace(
                "  secure:\n",
                &format!(
                    "  silent:\n    hosts: [silent.test]\n    scheme: http\n    port: {port}\n    connect_to: 127.0.0.1:{port}\n    allow_cleartext: true\n    inject: {{ header: Authorization, value: \"Bearer ${{credential}}\", credential: api_token }}\n  secure:\n"
                ),
            )
            .replace(
                "capabilities:\n  plain.issues.read:",
                "capabilities:\n  silent.read:\n    service: silent\n    routes: [GET /wait]\n  plain.issues.read:",
            )
            .replace("capabilities: [plain.issues.read, ", "capabilities: [silent.read, plain.issues.read, "),
            "  upstream_timeout: 500ms\n",
        )
    })
    .await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["plain.issues.read", "silent.read"]))
        .await;
    // The echo upstream reads the whole body before answering: a body that never ends means
    // no response head.
    let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
    let head = raw_req(
        &f,
        "POST",
        "plain.test",
        "/echo",
        &task,
        "Content-Length: 1000\r\n",
    );
    tcp.write_all(format!("{head}only-part").as_bytes())
        .await
        .unwrap();
    let start = Instant::now();
    let resp = crate::common::read_response(&mut tcp).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let problem: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let rec = kw.audit_for(problem["request_id"].as_str().unwrap()).await;
    assert_eq!(rec["reason"], "allowed");
    assert_eq!(rec["status"], 504);
    // An upstream that accepts and never answers.
    let start = Instant::now();
    let resp = kw
        .raw(&raw_req_at(port, "GET", "silent.test", "/wait", &task, ""))
        .await;
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(script.hits(), 1);
    let problem: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let rec = kw.audit_for(problem["request_id"].as_str().unwrap()).await;
    assert_eq!(rec["status"], 504);
    assert_eq!(rec["credential"], "api_token");
    // A hung upstream's requests are in its latency histogram, at the timeout, not left out.
    let series = |s: &str| format!("keyward_request_duration_seconds_{s}{{service=\"silent\"}}");
    assert_eq!(kw.metric(&series("count")).await, Some(1.0));
    let sum = kw.metric(&series("sum")).await.unwrap_or(0.0);
    assert!((0.5..3.0).contains(&sum), "observed {sum} s");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_rapid_reset_flood_is_cut_off_and_others_are_served() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let tls = tunnel_tls(&f, &task, "secure.test", &[b"h2"]).await;
    let (client, conn) = bounded("h2 handshake", h2::client::handshake(tls))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let mut client = client;
    let uri = f.tls_url("secure.test", "/echo");
    let flood = async {
        for _ in 0..5_000 {
            client = match client.ready().await {
                Ok(c) => c,
                Err(e) => return Some(e),
            };
            let req = http::Request::builder()
                .method("POST")
                .uri(&uri)
                .body(())
                .unwrap();
            match client.send_request(req, false) {
                Ok((_resp, mut stream)) => stream.send_reset(h2::Reason::CANCEL),
                Err(e) => return Some(e),
            }
        }
        None
    };
    let stopped = bounded("rapid reset flood", flood).await;
    // The flood is cut off before it ends: GOAWAY(ENHANCE_YOUR_CALM), or (when the client's
    // next write races the close) a broken connection; the connection task ends either way.
    let e = stopped.expect("5000 rapid resets went unanswered");
    let ended = bounded("connection end", conn).await.unwrap();
    let calm = |e: &h2::Error| e.is_go_away() && e.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
    assert!(
        calm(&e) || ended.as_ref().err().is_some_and(calm) || e.is_io(),
        "{e:?} / {ended:?}"
    );
    assert!(ended.is_err(), "{ended:?}");
    // No request body was complete: nothing the upstream saw carries a body.
    assert!(f.tls.seen().iter().all(|s| s.body.is_empty()));
    still_serving(&f).await;
    kw.assert_no_leaks().await;
}

/// The HTTP/2 client preface and an empty SETTINGS frame.
fn h2_preface() -> Vec<u8> {
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[]));
    out
}

/// An HPACK block for `GET /` on secure.test (https, the fixture's port).
fn get_root_block(f: &Fixture) -> Vec<u8> {
    let authority = format!("secure.test:{}", f.tls.port());
    let mut block = vec![0x82, 0x87, 0x84, 0x41, authority.len() as u8];
    block.extend_from_slice(authority.as_bytes());
    block
}

/// An HTTP/2 frame header plus payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// Sends a HEADERS frame without END_HEADERS and then `n` CONTINUATION frames of `fragment`;
/// returns whether keyward closed the connection (bounded) without answering stream 1.
async fn continuation_flood(f: &Fixture, task: &crate::common::Task, fragment: &[u8], n: usize) {
    let mut tls = tunnel_tls(f, task, "secure.test", &[b"h2"]).await;
    let block = get_root_block(f);
    let mut out = h2_preface();
    out.extend(frame(1, 0x1, 1, &block)); // END_STREAM, no END_HEADERS
    let writer = async {
        if tls.write_all(&out).await.is_err() {
            return;
        }
        let cont = frame(9, 0, 1, fragment);
        let batch: Vec<u8> = cont.iter().copied().cycle().take(cont.len() * 64).collect();
        for _ in 0..n / 64 {
            if tls.write_all(&batch).await.is_err() {
                return;
            }
        }
        let _ = tls.flush().await;
    };
    bounded("continuation flood", writer).await;
    // Read to the close: a GOAWAY (type 7) may come first; a HEADERS answer must not.
    let mut buf = Vec::new();
    let _ = bounded("close after the flood", tls.read_to_end(&mut buf)).await;
    let mut rest = &buf[..];
    let mut kinds = Vec::new();
    while rest.len() >= 9 {
        let len = (usize::from(rest[0]) << 16) | (usize::from(rest[1]) << 8) | usize::from(rest[2]);
        kinds.push((
            rest[3],
            u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]),
        ));
        rest = &rest[(9 + len).min(rest.len())..];
    }
    assert!(
        !kinds.iter().any(|&(k, s)| k == 1 && s == 1),
        "stream 1 was answered: {kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_continuation_floods_are_cut_off_and_others_are_served() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    // Growing header blocks: literal `x-pad: <64 bytes>` fields without indexing.
    let mut field = vec![0x00, 5];
    field.extend_from_slice(b"x-pad");
    field.push(64);
    field.extend_from_slice(&[b'a'; 64]);
    let fragment: Vec<u8> = field
        .iter()
        .copied()
        .cycle()
        .take(field.len() * 50)
        .collect();
    continuation_flood(&f, &task, &fragment, 20_000).await;
    // Empty CONTINUATION frames: the block never grows, only the frame count.
    continuation_flood(&f, &task, &[], 200_000).await;
    assert_eq!(f.tls.hits(), 0);
    still_serving(&f).await;
    kw.assert_no_leaks().await;
}

/// Connections that made a request keep their places: one more waits (in the backlog) until
/// a place frees up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_wait_for_a_free_slot() {
    let f = Fixture::start_with(|p| {
        with_proxy(
            p,
            "  max_connections: 3\n  max_task_connections: 4\n  max_agent_connections: 4\n",
        )
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let keep_alive = kept_alive(&f, "GET", &task);
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
        tcp.write_all(keep_alive.as_bytes()).await.unwrap();
        let resp = crate::common::read_response(&mut tcp).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        held.push(tcp);
    }
    let mut fourth = TcpStream::connect(kw.proxy_addr).await.unwrap();
    fourth
        .write_all(raw_req(&f, "GET", "plain.test", "/echo", &task, "").as_bytes())
        .await
        .unwrap();
    let mut b = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(300), fourth.read(&mut b)).await;
    assert!(
        early.is_err(),
        "a fourth connection was served over the cap"
    );
    assert_eq!(f.plain.hits(), 3);
    drop(held.pop());
    let resp = crate::common::read_response(&mut fourth).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(f.plain.hits(), 4);
    // The connections that made a request were not closed to make room.
    for tcp in &mut held {
        tcp.write_all(keep_alive.as_bytes()).await.unwrap();
        let resp = crate::common::read_response(tcp).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    kw.assert_no_leaks().await;
}

/// Connections that have sent no request (silent, or a head that never ends) cannot keep
/// agents out, however many and however often they come back: with every place taken, the
/// oldest of them is closed for each connection that knocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_holding_every_place_make_room_for_agents() {
    let f = Fixture::start_with(|p| {
        with_proxy(
            p,
            "  max_connections: 8\n  max_task_connections: 8\n  max_agent_connections: 8\n",
        )
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    // One agent connection known by its first request, then every other place held by
    // strangers: half silent, half dripping a head.
    let keep_alive = kept_alive(&f, "GET", &task);
    let mut agent = TcpStream::connect(kw.proxy_addr).await.unwrap();
    agent.write_all(keep_alive.as_bytes()).await.unwrap();
    assert_eq!(crate::common::read_response(&mut agent).await.status, 200);
    let mut strangers = Vec::new();
    for i in 0..7 {
        let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
        if i % 2 == 0 {
            tcp.write_all(b"GET http://plain.test").await.unwrap();
        }
        strangers.push(tcp);
    }
    for _ in 0..100 {
        let open = kw.metric("keyward_connections_open{kind=\"http\"}").await;
        if open.unwrap_or(0.0) >= 8.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each new agent connection (kept open, so every place stays taken) is served at once
    // (header_read_timeout is 10 s), and the stranger it displaced is closed, oldest first.
    let mut agents = Vec::new();
    for (round, oldest) in strangers.iter_mut().take(3).enumerate() {
        let started = Instant::now();
        let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
        tcp.write_all(keep_alive.as_bytes()).await.unwrap();
        let resp = crate::common::read_response(&mut tcp).await;
        assert_eq!(resp.status, 200, "round {round}: {}", resp.text());
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "round {round}: waited"
        );
        agents.push(tcp);
        let mut b = [0u8; 1];
        let closed = bounded("the oldest stranger to close", oldest.read(&mut b)).await;
        assert!(
            matches!(closed, Ok(0) | Err(_)),
            "round {round}: {closed:?}"
        );
    }
    // The agent's own connection kept its place.
    agent.write_all(keep_alive.as_bytes()).await.unwrap();
    assert_eq!(crate::common::read_response(&mut agent).await.status, 200);
    kw.assert_no_leaks().await;
}

/// Clients without a token that outnumber the places and reconnect the moment they are
/// closed do not keep agents out either: a connection just accepted has a moment to send its
/// head before it can be the one to make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_reconnecting_at_once_do_not_keep_agents_out() {
    let f = Fixture::start_with(|p| with_proxy(p, "  max_connections: 8\n")).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let addr = kw.proxy_addr;
    // Threads of their own (as another process's would be), not tasks sharing keyward's
    // runtime: they reconnect as fast as the kernel lets them.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let churn: Vec<_> = (0..96)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                use std::io::Read;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let Ok(mut tcp) = std::net::TcpStream::connect(addr) else {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    };
                    let _ = tcp.set_read_timeout(Some(Duration::from_millis(500)));
                    let _ = tcp.read(&mut [0u8; 1]);
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The agent writes its head 30 ms after connecting (a client that connects, then builds
    // its request; or a slower network): fast churn closed such a newcomer before its head
    // came.
    for round in 0..4 {
        let started = Instant::now();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tokio::time::sleep(Duration::from_millis(30)).await;
        let head = raw_req(&f, "GET", "plain.test", "/echo", &task, "");
        let _ = tcp.write_all(head.as_bytes()).await;
        let resp = crate::common::read_response(&mut tcp).await;
        assert_eq!(resp.status, 200, "round {round}: {}", resp.text());
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "round {round}: {:?}",
            started.elapsed()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for c in churn {
        let _ = c.join();
    }
    kw.assert_no_leaks().await;
}

/// A client that cannot authenticate does not keep its connection: asking once in a while
/// without a token (no timeout fires between complete heads) it held every place under
/// `max_connections`, and tasks waited in the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_without_a_valid_token_cannot_hold_the_connection_places() {
    let f = Fixture::start_with(|p| with_proxy(p, "  max_connections: 4\n")).await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    // Keep-alive heads: without a token, and with a token keyward never issued.
    let port = f.plain.port();
    let anonymous =
        format!("GET http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\n\r\n");
    let forged = format!(
        "GET http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: Basic dGFzay14Omt3X3g=\r\n\r\n"
    );
    let connect =
        format!("CONNECT secure.test:{port} HTTP/1.1\r\nHost: secure.test:{port}\r\n\r\n");
    // Refused before any token is looked at: an origin-form request.
    let origin_form = "GET /echo HTTP/1.1\r\nHost: plain.test\r\n\r\n".to_string();
    let mut hogs = Vec::new();
    for (head, status) in [
        (&anonymous, 407),
        (&forged, 407),
        (&connect, 407),
        (&origin_form, 400),
    ] {
        let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
        tcp.write_all(head.as_bytes()).await.unwrap();
        let resp = crate::common::read_response(&mut tcp).await;
        assert_eq!(resp.status, status, "{}", resp.text());
        assert_eq!(resp.header("connection").as_deref(), Some("close"));
        hogs.push(tcp);
    }
    // Each is closed after its 407 (a second head would get nothing)...
    for tcp in &mut hogs {
        let _ = tcp.write_all(anonymous.as_bytes()).await;
        let mut rest = Vec::new();
        let read = bounded("the close after a 407", tcp.read_to_end(&mut rest)).await;
        assert!(
            read.is_err() || rest.is_empty(),
            "{}",
            String::from_utf8_lossy(&rest)
        );
    }
    // ...so the places are free for a task while the hogs still hold their sockets.
    let resp = kw
        .raw(&raw_req(&f, "GET", "plain.test", "/echo", &task, ""))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    kw.assert_no_leaks().await;
}

/// Nor can one agent, through several tasks: all of an agent's tasks together hold at most
/// `max_agent_connections` (by default half of `max_connections`); past that a task of that
/// agent gets 429 on a new connection, while another agent's task is served. A place freed by
/// one of the agent's tasks can be taken by another of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_cannot_hold_every_connection_place_through_many_tasks() {
    let f = Fixture::start_with(|p| {
        with_proxy(
            p,
            "  max_connections: 16\n  max_task_connections: 2\n  max_agent_connections: 3\n",
        )
    })
    .await;
    let kw = &f.kw;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(kw.mint("bot", json!(["plain.issues.read"])).await);
    }
    let other = kw.mint("reader", json!(["plain.issues.read"])).await;
    let keep_alive = |task| kept_alive(&f, "GET", task);
    let mut held = Vec::new();
    for task in [&tasks[0], &tasks[0], &tasks[1]] {
        let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
        tcp.write_all(keep_alive(task).as_bytes()).await.unwrap();
        let resp = crate::common::read_response(&mut tcp).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        held.push(tcp);
    }
    // The agent's fourth connection, from a task that holds none: 429, naming the setting.
    for task in [&tasks[1], &tasks[2]] {
        let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
        tcp.write_all(keep_alive(task).as_bytes()).await.unwrap();
        let resp = crate::common::read_response(&mut tcp).await;
        let (problem, _) = kw.assert_denied_raw(&resp, 429, "budget_exhausted").await;
        assert!(
            problem["detail"]
                .as_str()
                .is_some_and(|d| d.contains("max_agent_connections")),
            "{problem}"
        );
        assert_eq!(resp.header("connection").as_deref(), Some("close"));
    }
    let resp = kw
        .raw(&raw_req(&f, "GET", "plain.test", "/echo", &other, ""))
        .await;
    assert_eq!(resp.status, 200, "another agent: {}", resp.text());
    // A place the agent frees is its other tasks' to take.
    drop(held.pop());
    let mut served = false;
    for _ in 0..100 {
        let resp = kw
            .raw(&raw_req(&f, "GET", "plain.test", "/echo", &tasks[2], ""))
            .await;
        if resp.status == 200 {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(served, "the freed place was not given back to the agent");
    kw.assert_no_leaks().await;
}

/// One task cannot hold every connection place: kept-alive connections that each send an
/// allowed (or a denied) request now and then never time out, nor do tunnels. A task holds at
/// most `max_task_connections` (by default a quarter of `max_connections`); past that its new
/// connection gets 429 and is closed, and other tasks are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_task_cannot_hold_every_connection_place() {
    let f =
        Fixture::start_with(|p| with_proxy(p, "  max_connections: 8\n  max_task_connections: 2\n"))
            .await;
    let kw = &f.kw;
    let hog = kw
        .mint("bot", json!(["plain.issues.read", "secure.read"]))
        .await;
    let other = kw.mint("reader", json!(["plain.issues.read"])).await;
    let keep_alive = |task| kept_alive(&f, "GET", task);
    // Two kept-alive connections, one allowed request each, a denied one on the second.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
        tcp.write_all(keep_alive(&hog).as_bytes()).await.unwrap();
        let resp = crate::common::read_response(&mut tcp).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        held.push(tcp);
    }
    let denied = kept_alive(&f, "DELETE", &hog);
    held[1].write_all(denied.as_bytes()).await.unwrap();
    let resp = crate::common::read_response(&mut held[1]).await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert_eq!(resp.header("connection"), None, "a held connection is kept");
    let (_, view) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", hog.id), None)
        .await;
    assert_eq!(view["connections"], 2, "{view}");

    // A third connection of the same task, plain or CONNECT: 429, closed.
    let mut third = TcpStream::connect(kw.proxy_addr).await.unwrap();
    third.write_all(keep_alive(&hog).as_bytes()).await.unwrap();
    let resp = crate::common::read_response(&mut third).await;
    let (problem, _) = kw.assert_denied_raw(&resp, 429, "budget_exhausted").await;
    assert!(
        problem["detail"]
            .as_str()
            .is_some_and(|d| d.contains("max_task_connections")),
        "{problem}"
    );
    assert_eq!(resp.header("retry-after").as_deref(), Some("1"));
    assert_eq!(resp.header("connection").as_deref(), Some("close"));
    let mut rest = Vec::new();
    let _ = bounded("the close after a 429", third.read_to_end(&mut rest)).await;
    assert!(rest.is_empty(), "{}", String::from_utf8_lossy(&rest));
    let authority = format!("secure.test:{}", f.tls.port());
    let (_, head) = connect_raw(kw.proxy_addr, &authority, Some(&Harness::proxy_auth(&hog))).await;
    kw.assert_denied_raw(&head, 429, "budget_exhausted").await;
    assert_eq!(f.plain.hits(), 2);

    // Another task is served meanwhile.
    let resp = kw
        .raw(&raw_req(&f, "GET", "plain.test", "/echo", &other, ""))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());

    // Once one of its connections closes, the task may open another.
    drop(held.pop());
    let mut freed = false;
    for _ in 0..100 {
        let (_, view) = kw
            .admin(http::Method::GET, &format!("/v1/tasks/{}", hog.id), None)
            .await;
        if view["connections"] == 1 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "the closed connection still counts");
    let resp = kw
        .raw(&raw_req(&f, "GET", "plain.test", "/echo", &hog, ""))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tasks_stalled_connections_cannot_starve_another_task_past_the_head_timeout() {
    let f = Fixture::start_with(|p| {
        with_proxy(p, "  max_connections: 4\n  header_read_timeout: 400ms\n")
    })
    .await;
    let kw = &f.kw;
    let hog = kw.mint("bot", json!(["plain.issues.read"])).await;
    let victim = kw.mint("reader", json!(["plain.issues.read"])).await;
    let hog_head = raw_req(&f, "GET", "plain.test", "/echo", &hog, "");
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
        // Everything but the final CRLF: authenticated only once the head completes.
        tcp.write_all(&hog_head.as_bytes()[..hog_head.len() - 2])
            .await
            .unwrap();
        held.push(tcp);
    }
    let start = Instant::now();
    let resp = kw
        .raw(&raw_req(&f, "GET", "plain.test", "/echo", &victim, ""))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "the other task waited {:?}",
        start.elapsed()
    );
    let rec = crate::headers::allowed_record(kw, &victim, "/echo").await;
    assert_eq!(rec["agent"], "reader");
    assert_eq!(f.plain.hits(), 1);
    drop(held);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_concurrent_streams_are_capped_per_connection() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let tls = tunnel_tls(&f, &task, "secure.test", &[b"h2"]).await;
    let (mut client, mut conn) = bounded("h2 handshake", h2::client::handshake(tls))
        .await
        .unwrap();
    let req = http::Request::builder()
        .method("GET")
        .uri(f.tls_url("secure.test", "/echo"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    // Drive the connection until the first response (the server's SETTINGS come first).
    let resp = bounded("first response", async {
        tokio::select! {
            r = resp => r,
            _ = &mut conn => panic!("connection ended"),
        }
    })
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    // As many as the tunnel's task may have in flight (default 64): a client that keeps to
    // it never meets the 429 for too many at once.
    let cap = conn.max_concurrent_send_streams();
    assert_eq!(cap, 64, "max_concurrent_streams");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_hanging_up_mid_stream_leaves_exactly_one_record() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
    tcp.write_all(raw_req(&f, "GET", "plain.test", "/sse", &task, "").as_bytes())
        .await
        .unwrap();
    // Read the head and the first event, then hang up while the stream goes on.
    let mut buf = Vec::new();
    while !String::from_utf8_lossy(&buf).contains("event 1") {
        let mut b = [0u8; 256];
        let n = bounded("first event", tcp.read(&mut b)).await.unwrap();
        assert!(n > 0);
        buf.extend_from_slice(&b[..n]);
    }
    kw.saw(&String::from_utf8_lossy(&buf));
    drop(tcp);
    let rec = kw
        .audit_where("the /sse record", |r| {
            r["path"] == "/sse" && r["task"] == task.id.as_str()
        })
        .await;
    let rec = kw.audit_for(rec["request_id"].as_str().unwrap()).await;
    assert_eq!(rec["reason"], "allowed");
    assert_eq!(rec["outcome"], "client_closed", "{rec}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_stalls_its_tls_handshake_is_bounded_by_the_connect_timeout() {
    // Accepts TCP, never says a word: keyward's TLS client waits for a ServerHello.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            held.push(tcp);
        }
    });
    let f = Fixture::start_with(|p| {
        with_proxy(
            crate::common::tls_services_at(p, port),
            "  connect_timeout: 300ms\n",
        )
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut conn = crate::common::h1_over(
        crate::headers::tunnel_tls_at(&f, &task, "secure.test", port, &[b"http/1.1"]).await,
    )
    .await;
    let start = Instant::now();
    let resp = crate::common::h1_send(
        &mut conn,
        crate::headers::get("/echo", &format!("secure.test:{port}")),
    )
    .await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 504, "{}", resp.text());
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let problem: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
    let rec = kw.audit_for(problem["request_id"].as_str().unwrap()).await;
    assert_eq!(rec["reason"], "allowed");
    assert_eq!(rec["status"], 504);
    assert_eq!(rec["outcome"], "timeout", "{rec}");
    hold.abort();
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tasks_flood_of_slow_requests_is_capped_per_task_and_others_are_served() {
    let script = ScriptUpstream::start(|_| Reply::hang()).await;
    let port = script.port();
    let f = Fixture::start_with(|p| {
        with_proxy(
            crate::common::plain_services_at(p, port),
            "  max_task_in_flight: 3\n",
        )
    })
    .await;
    let kw = &f.kw;
    let hog = kw.mint("bot", json!(["plain.issues.read"])).await;
    let victim = kw.mint("reader", json!(["plain.issues.read"])).await;
    // Three requests the upstream never answers: the hog's three places.
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
        tcp.write_all(raw_req_at(port, "GET", "plain.test", "/echo", &hog, "").as_bytes())
            .await
            .unwrap();
        held.push(tcp);
    }
    // Bounded poll on an observable state: all three reached the upstream.
    for _ in 0..100 {
        if script.hits() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(script.hits(), 3);
    // The hog's fourth is refused at once, uncharged; nothing more reaches the upstream.
    let start = Instant::now();
    let resp = kw
        .raw(&raw_req_at(port, "GET", "plain.test", "/echo", &hog, ""))
        .await;
    assert!(start.elapsed() < Duration::from_secs(2));
    kw.assert_denied_raw(&resp, 429, "budget_exhausted").await;
    assert_eq!(resp.header("retry-after").as_deref(), Some("1"));
    assert_eq!(script.hits(), 3);
    let (_, t) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", hog.id), None)
        .await;
    assert_eq!(t["requests_used"], 3, "the refused one was charged: {t}");
    // Another task is not affected: its request goes out at once.
    let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
    tcp.write_all(raw_req_at(port, "GET", "plain.test", "/echo", &victim, "").as_bytes())
        .await
        .unwrap();
    for _ in 0..100 {
        if script.hits() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(script.hits(), 4, "the other task's request was held back");
    let last = script.seen().pop().unwrap();
    assert_eq!(
        last.header_all("authorization"),
        vec![format!("Bearer {}", f.creds.api_token)]
    );
    drop(held);
    drop(tcp);
    kw.assert_no_leaks().await;
}

/// SECURITY (I7): a record's size is bounded whatever the request: an unauthenticated flood of
/// long paths (each refused 407, each recorded) would otherwise fill the audit disk at 60 KB a
/// record, and then keyward refuses every task. The path is cut and says how much was: to
/// 256 bytes for a request no task stands behind, and its escaped length counts (`é`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_path_is_cut_in_its_record() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let path = format!("/{}", "a".repeat(30_000));
    let resp = kw
        .raw(&format!(
            "GET http://plain.test{path} HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(resp.status, 407, "{}", resp.text());
    let rec = kw.audit_where("the 407", |r| r["status"] == 407).await;
    let recorded = rec["path"].as_str().unwrap();
    assert!(recorded.starts_with("/aaaa"), "{recorded}");
    assert!(recorded.ends_with("\u{2026}(+29745 bytes)"), "{recorded}");
    let path = format!("/{}", "%C3%A9".repeat(3_000));
    let resp = kw
        .raw(&format!(
            "GET http://plain.test{path} HTTP/1.1\r\nHost: plain.test\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(resp.status, 407, "{}", resp.text());
    kw.audit_count(2, |r| r["status"] == 407).await;
    assert!(
        kw.audit_text().len() < 2 * 1024,
        "{} bytes",
        kw.audit_text().len()
    );
}

/// SECURITY (I7): a task refused in a loop is paced (each refusal writes an audit record, and
/// a loop of them, pipelined or over many connections, wrote tens of MB a second until the
/// audit disk filled and keyward refused every task): a second's worth of its denials goes at
/// once, the rest wait their turn; with `max_task_in_flight` of them waiting, a further one is
/// answered at once but closes its connection. Another task's refusals are not slowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tasks_refusal_loop_is_paced_and_a_flood_loses_its_connections() {
    let f = Fixture::start_with(|p| {
        with_proxy(
            p,
            "  max_task_denials_per_second: 1\n  max_task_in_flight: 2\n",
        )
    })
    .await;
    let kw = &f.kw;
    let looper = kw.mint("bot", json!(["plain.issues.read"])).await;
    let other = kw.mint("bot", json!(["plain.issues.read"])).await;
    // DELETE is not granted: method_not_allowed, on a connection the task keeps.
    let refused = |task: &crate::common::Task| kept_alive(&f, "DELETE", task);

    // Three refusals one after another: the first at once, then one a second.
    let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
    let start = Instant::now();
    for i in 0..3 {
        tcp.write_all(refused(&looper).as_bytes()).await.unwrap();
        let resp = bounded("a paced refusal", read_response(&mut tcp)).await;
        assert_eq!(resp.status, 403, "refusal {i}: {}", resp.text());
        assert_eq!(
            resp.header("connection"),
            None,
            "refusal {i} kept its connection"
        );
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(1500),
        "3 refusals in {took:?}"
    );

    // Another task's refusal is its own: at once.
    let start = Instant::now();
    let resp = kw
        .raw(&raw_req(&f, "DELETE", "plain.test", "/echo", &other, ""))
        .await;
    assert_eq!(resp.status, 403);
    assert!(
        start.elapsed() < Duration::from_millis(900),
        "{:?}",
        start.elapsed()
    );

    // Two more of the looper's wait (about 1 s and 2 s); a third, with both waiting, is
    // answered at once and its connection closed.
    let mut waiting = Vec::new();
    for _ in 0..2 {
        let mut tcp = TcpStream::connect(kw.proxy_addr).await.unwrap();
        tcp.write_all(refused(&looper).as_bytes()).await.unwrap();
        waiting.push(tcp);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut flood = TcpStream::connect(kw.proxy_addr).await.unwrap();
    flood.write_all(refused(&looper).as_bytes()).await.unwrap();
    let resp = bounded("the flooding refusal", read_response(&mut flood)).await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    assert_eq!(resp.header("connection").as_deref(), Some("close"));
    let mut rest = Vec::new();
    let n = bounded(
        "the flooding connection closes",
        flood.read_to_end(&mut rest),
    )
    .await
    .unwrap();
    assert_eq!(n, 0);
    for mut tcp in waiting {
        let resp = bounded("a waiting refusal", read_response(&mut tcp)).await;
        assert_eq!(resp.status, 403);
        assert_eq!(resp.header("connection"), None);
    }
    // A refusal whose agent hangs up while it waits is recorded all the same.
    let mut gone = TcpStream::connect(kw.proxy_addr).await.unwrap();
    gone.write_all(refused(&looper).as_bytes()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(gone);
    // Every refusal has its record.
    let records = kw
        .audit_count(8, |r| r["reason"] == "method_not_allowed")
        .await;
    assert_eq!(records.len(), 8);
    kw.assert_no_leaks().await;
}

/// SECURITY (I7): a flooding task's HTTP/2 tunnel goes within a moment, with few records, even
/// for a client that never answers PING. HTTP/2's graceful close waits for that answer before
/// it stops taking streams, and such a client went on opening them, each refused and recorded
/// at once, for as long as the close took.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_flood_ignoring_ping_loses_its_tunnel_with_few_records() {
    let f = Fixture::start_with(|p| {
        with_proxy(
            p,
            "  max_task_denials_per_second: 1\n  max_task_in_flight: 2\n",
        )
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    // GET / on secure.test: no route of secure.read.
    let block = get_root_block(&f);
    // Four tunnels at once, each opening a stream every millisecond; never a PING answer.
    let start = Instant::now();
    let mut floods = Vec::new();
    for _ in 0..4 {
        let tls = tunnel_tls(&f, &task, "secure.test", &[b"h2"]).await;
        let block = block.clone();
        floods.push(tokio::spawn(async move {
            let (mut rd, mut wr) = tokio::io::split(tls);
            let writer = tokio::spawn(async move {
                let mut out = h2_preface();
                for id in (1u32..20_000).step_by(2) {
                    out.extend(frame(1, 0x5, id, &block));
                    if wr.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            });
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = bounded("a flooding tunnel ends", rd.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
            }
            writer.abort();
        }));
    }
    for flood in floods {
        flood.await.unwrap();
    }
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(4),
        "the tunnels stayed open {took:?}"
    );
    let records = kw
        .audit_count(4, |r| r["reason"] == "route_not_in_intent")
        .await;
    assert!(records.len() <= 12, "{} refusals recorded", records.len());
}

/// An HTTP/2 stream the agent takes nothing more of (it never opens the stream's window) is
/// never polled again, so it cannot notice its task's end by itself; with the client's
/// 64 KiB window keyward's socket never fills either, so `send_timeout` does not fire. A
/// revocation still ends it at once: the stream is reset, its record written, its place in
/// flight (and its upstream connection) freed. The tunnel stays for the next request's 407.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_ends_http2_streams_the_agent_stopped_taking() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let tls = tunnel_tls(&f, &task, "secure.test", &[b"h2"]).await;
    let (mut client, conn) = bounded("h2 handshake", h2::client::handshake(tls))
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let mut bodies = Vec::new();
    for _ in 0..2 {
        let req = http::Request::builder()
            .uri(f.tls_url("secure.test", "/big"))
            .body(())
            .unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        let resp = bounded("response head", resp).await.unwrap();
        assert_eq!(resp.status(), 200);
        // Held, never read: no window is given back.
        bodies.push(resp.into_body());
    }
    let (_, v) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(v["requests_in_flight"], 2, "{v}");

    kw.revoke(&task.id).await;
    let recs = kw
        .audit_count(2, |r| r["task"] == task.id.as_str() && r["path"] == "/big")
        .await;
    for rec in &recs {
        assert_eq!(rec["outcome"], "task_revoked", "{rec}");
        assert_eq!(rec["reason"], "allowed", "{rec}");
    }
    let (_, v) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(v["requests_in_flight"], 0, "{v}");
    // Each stream was reset: what the client still holds ends in an error, not the body's end.
    for mut body in bodies {
        let ended = bounded("stream reset", async {
            loop {
                match body.data().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Some(e),
                    None => return None,
                }
            }
        })
        .await;
        assert!(ended.is_some(), "a cut stream ended as if whole");
    }
    // The tunnel itself stays: its next request gets the 407 (SPEC §4.2).
    let req = http::Request::builder()
        .uri(f.tls_url("secure.test", "/echo"))
        .body(())
        .unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let resp = bounded("the 407", resp).await.unwrap();
    assert_eq!(resp.status(), 407);
    driver.abort();
    kw.assert_no_leaks().await;
}

/// The same over HTTP/1.1 in a tunnel: an agent that stopped reading a large answer (keyward's
/// writes wait on a full socket, so the answer is not polled) loses the connection soon after
/// its task is revoked, not at `send_timeout`; the record says why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_ends_an_http1_answer_the_agent_stopped_reading() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut tls = tunnel_tls(&f, &task, "secure.test", &[b"http/1.1"]).await;
    let authority = format!("secure.test:{}", f.tls.port());
    let request = format!("GET /big HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    bounded("write", tls.write_all(request.as_bytes()))
        .await
        .unwrap();
    let mut head = [0u8; 512];
    let n = bounded("head", tls.read(&mut head)).await.unwrap();
    assert!(head[..n].starts_with(b"HTTP/1.1 200"));
    // Then nothing more is read, until the socket buffers are full.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    kw.revoke(&task.id).await;
    let rec = kw
        .audit_where("the cut answer", |r| {
            r["task"] == task.id.as_str() && r["path"] == "/big"
        })
        .await;
    assert_eq!(rec["outcome"], "task_revoked", "{rec}");
    let (_, v) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(v["requests_in_flight"], 0, "{v}");
    drop(tls);
    kw.assert_no_leaks().await;
}

/// A request inside a tunnel still waiting on its upstream when its task expires gets the
/// 407 then (its tunnel watches the task), over HTTP/2 and HTTP/1.1, and is recorded as cut
/// by the expiry: not reset, not taken for a client that hung up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_waiting_in_a_tunnel_when_its_task_expires_gets_the_407() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    for alpn in [&b"h2"[..], &b"http/1.1"[..]] {
        let task = kw
            .mint_with(json!({"agent": "bot", "intent": ["secure.read"], "ttl": "2s"}))
            .await;
        let tls = tunnel_tls(&f, &task, "secure.test", &[alpn]).await;
        let req = http::Request::builder()
            .uri(f.tls_url("secure.test", "/stall"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let resp = if alpn == b"h2" {
            let mut h2 = crate::common::h2_over(tls).await;
            crate::common::h2_send(&mut h2, req).await
        } else {
            let mut h1 = crate::common::h1_over(tls).await;
            crate::common::h1_send(&mut h1, req).await
        };
        // (Its record is the allowed request's, cut: checked below.)
        assert_eq!(resp.status, 407, "{}", resp.text());
        assert_eq!(
            resp.header("x-keyward-reason").as_deref(),
            Some("task_expired")
        );
        let rec = kw
            .audit_where("the cut request", |r| {
                r["task"] == task.id.as_str() && r["path"] == "/stall"
            })
            .await;
        assert_eq!(rec["outcome"], "task_expired", "{rec}");
        assert_eq!(rec["status"], 407, "{rec}");
    }
    kw.assert_no_leaks().await;
}
