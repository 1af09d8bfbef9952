//! Upgrades: only WebSocket, only on a route the task's intent allows, only after a real `101`
//! from the upstream. An upstream that answers 200 or 400 to an upgrade gets no relayed
//! tunnel; `h2c` (by upgrade or prior knowledge) and other protocols are never relayed, and an
//! upstream that switches protocols unasked is a 502.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::common::{
    bounded, connect_raw, extend_policy, read_response, ring, tls_over, Fixture, Harness, RawResp,
    Task, TestCa,
};

/// A raw upstream that reads one request head per connection, records it, writes `answer`,
/// then records (and, after a 101, echoes) every byte that follows on that connection.
struct Scripted {
    addr: SocketAddr,
    heads: Arc<Mutex<Vec<String>>>,
    after: Arc<Mutex<Vec<u8>>>,
    connections: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Scripted {
    async fn start(answer: &str) -> Scripted {
        Self::start_shared(Arc::new(Mutex::new(answer.to_string()))).await
    }

    /// The same behind TLS with a certificate for `name` signed by `ca` (ALPN http/1.1).
    async fn start_tls(answer: &str, ca: &TestCa, name: &str) -> Scripted {
        Self::start_tls_alpn(answer, ca, name, &[b"http/1.1"]).await
    }

    /// Behind TLS offering `alpn` (it still speaks only HTTP/1.1: a client that picked `h2`
    /// would get nowhere).
    async fn start_tls_alpn(answer: &str, ca: &TestCa, name: &str, alpn: &[&[u8]]) -> Scripted {
        let (cert, key) = ca.leaf(&[name]);
        let mut cfg = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        Self::spawn(Arc::new(Mutex::new(answer.to_string())), Some(acceptor)).await
    }

    /// Like `start`, with an answer the test may set later (once it knows a credential).
    async fn start_shared(answer: Arc<Mutex<String>>) -> Scripted {
        Self::spawn(answer, None).await
    }

    async fn spawn(answer: Arc<Mutex<String>>, tls: Option<tokio_rustls::TlsAcceptor>) -> Scripted {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let after: Arc<Mutex<Vec<u8>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let (h, a, c) = (heads.clone(), after.clone(), connections.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let answer = answer.lock().unwrap().clone();
                let (h, a, tls) = (h.clone(), a.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve_one(stream, answer, h, a).await;
                            }
                        }
                        None => serve_one(tcp, answer, h, a).await,
                    }
                });
            }
        });
        Scripted {
            addr,
            heads,
            after,
            connections,
            accept,
        }
    }

    fn port(&self) -> u16 {
        self.addr.port()
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    /// Bytes received after a request head (a relayed tunnel would put the agent's here).
    fn after(&self) -> Vec<u8> {
        self.after.lock().unwrap().clone()
    }

    fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

async fn serve_one<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut tcp: S,
    answer: String,
    heads: Arc<Mutex<Vec<String>>>,
    after: Arc<Mutex<Vec<u8>>>,
) {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match tcp.read(&mut b).await {
            Ok(1) => head.push(b[0]),
            _ => return,
        }
    }
    heads
        .lock()
        .unwrap()
        .push(String::from_utf8_lossy(&head).into_owned());
    if tcp.write_all(answer.as_bytes()).await.is_err() {
        return;
    }
    let switched = answer.starts_with("HTTP/1.1 101");
    let mut buf = [0u8; 4096];
    let mut pending = Vec::new();
    while let Ok(n) = tcp.read(&mut buf).await {
        if n == 0 {
            break;
        }
        after.lock().unwrap().extend_from_slice(&buf[..n]);
        pending.extend_from_slice(&buf[..n]);
        if switched && tcp.write_all(&echo_frames(&mut pending)).await.is_err() {
            break;
        }
    }
}

/// What a WebSocket server echoes for the client frames in `pending` (short ones: the tests
/// send no other): each whole masked frame, unmasked; the rest stays pending.
fn echo_frames(pending: &mut Vec<u8>) -> Vec<u8> {
    let mut out = Vec::new();
    while pending.len() >= 6 {
        let len = usize::from(pending[1] & 0x7f);
        assert!(len < 126 && pending[1] & 0x80 != 0, "a short masked frame");
        if pending.len() < 6 + len {
            break;
        }
        let mask = [pending[2], pending[3], pending[4], pending[5]];
        out.extend([pending[0], len as u8]);
        out.extend((0..len).map(|i| pending[6 + i] ^ mask[i % 4]));
        pending.drain(..6 + len);
    }
    out
}

const SWITCH_WS: &str = "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
const SWITCH_H2C: &str =
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n";
const OK_200: &str = "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok";
const BAD_400: &str =
    "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: 3\r\n\r\nno\n";

/// A masked WebSocket text frame ("Hello", RFC 6455 §5.7), as a client sends it.
const FRAME: &[u8] = b"\x81\x85\x37\xfa\x21\x3d\x7f\x9f\x4d\x51\x58";
/// The same frame as a server sends it back (unmasked).
const ECHO: &[u8] = b"\x81\x05Hello";

/// The standard fixture plus service `ws.test` on the scripted upstream, with capability
/// `ws.socket` (`GET /socket`) held by agent `wsbot`.
async fn fixture_with(up: &Scripted) -> Fixture {
    fixture_on(up.port()).await
}

/// The same with service `ws.test` on the upstream at `port`.
async fn fixture_on(port: u16) -> Fixture {
    let services = format!(
        r#"  ws:
    hosts: [ws.test]
    scheme: http
    port: {port}
    connect_to: 127.0.0.1:{port}
    allow_cleartext: true
    inject: {{ header: Authorization, value: "Bearer ${{credential}}", credential: api_token }}
"#
    );
    let caps = "  ws.socket:\n    service: ws\n    risk: low\n    routes: [GET /socket]\n  ws.other:\n    service: ws\n    risk: low\n    routes: [GET /other]\n";
    let agents =
        "  wsbot:\n    owner: tests\n    capabilities: [ws.socket, ws.other]\n    max_ttl: 1h\n";
    Fixture::start_with(move |p| extend_policy(&p, &services, caps, agents)).await
}

fn upgrade_request(port: u16, method: &str, path: &str, task: &Task, upgrade: &str) -> String {
    format!(
        "{method} http://ws.test:{port}{path} HTTP/1.1\r\nHost: ws.test:{port}\r\nProxy-Authorization: {}\r\n{upgrade}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n",
        Harness::proxy_auth(task)
    )
}

const WS: &str = "Connection: Upgrade\r\nUpgrade: websocket\r\n";

/// Sends `request` on a new connection and reads one response, keeping the connection.
async fn send_head(kw: &Harness, request: &str) -> (TcpStream, RawResp) {
    let mut tcp = bounded("connect", TcpStream::connect(kw.proxy_addr))
        .await
        .unwrap();
    bounded("write", tcp.write_all(request.as_bytes()))
        .await
        .unwrap();
    let resp = read_response(&mut tcp).await;
    kw.saw(&resp.text());
    (tcp, resp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_is_relayed_only_after_a_real_101() {
    let up = Scripted::start(SWITCH_WS).await;
    let f = fixture_with(&up).await;
    let kw = &f.kw;
    let task = kw.mint("wsbot", json!(["ws.socket"])).await;
    let (mut tcp, resp) =
        send_head(kw, &upgrade_request(up.port(), "GET", "/socket", &task, WS)).await;
    assert_eq!(resp.status, 101, "{}", resp.text());
    assert_eq!(resp.header("upgrade").as_deref(), Some("websocket"));
    let heads = up.heads();
    assert_eq!(heads.len(), 1);
    let head = heads[0].to_ascii_lowercase();
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(
        head.contains(&format!(
            "authorization: bearer {}",
            f.creds.api_token.to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(!head.contains("proxy-authorization"), "{head}");
    // Frames flow both ways once both sides switched.
    bounded("write frame", tcp.write_all(FRAME)).await.unwrap();
    let mut back = vec![0u8; ECHO.len()];
    bounded("read echo", tcp.read_exact(&mut back))
        .await
        .unwrap();
    assert_eq!(back, ECHO);
    // The relay is the agent's connection, still open (it holds a place under
    // max_connections, so the gauge must show it).
    const OPEN: &str = "keyward_connections_open{kind=\"http\"}";
    assert_eq!(kw.metric(OPEN).await, Some(1.0));
    drop(tcp);
    let rec = kw
        .audit_where("the websocket", |r| r["status"] == 101)
        .await;
    crate::common::assert_record(&rec);
    assert_eq!(rec["reason"], "allowed", "{rec}");
    assert_eq!(rec["capability"], "ws.socket", "{rec}");
    // The relayed frame counts as sent up (the upgrade request itself had no body).
    assert_eq!(rec["bytes_up"], FRAME.len(), "{rec}");
    assert_eq!(kw.metric_settled(OPEN, 0.0).await, Some(0.0));
    assert_eq!(kw.audit_records().len(), 1);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_reflected_in_a_101_is_not_handed_to_the_agent() {
    let answer = Arc::new(Mutex::new(String::new()));
    let up = Scripted::start_shared(answer.clone()).await;
    let f = fixture_with(&up).await;
    let kw = &f.kw;
    *answer.lock().unwrap() = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nX-Echo-Auth: Bearer {}\r\nSec-WebSocket-Protocol: {}\r\n\r\n",
        f.creds.api_token, f.creds.api_token
    );
    let task = kw.mint("wsbot", json!(["ws.socket"])).await;
    let (tcp, resp) = send_head(kw, &upgrade_request(up.port(), "GET", "/socket", &task, WS)).await;
    assert_eq!(resp.status, 101, "{}", resp.text());
    for (n, v) in &resp.headers {
        assert!(
            !v.contains(&f.creds.api_token),
            "`{n}` carries the credential"
        );
    }
    drop(tcp);
    kw.audit_where("the websocket", |r| r["status"] == 101)
        .await;
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_answering_200_or_400_to_an_upgrade_gets_no_tunnel() {
    for (answer, status) in [(OK_200, 200u16), (BAD_400, 400)] {
        let up = Scripted::start(answer).await;
        let f = fixture_with(&up).await;
        let kw = &f.kw;
        let task = kw.mint("wsbot", json!(["ws.socket"])).await;
        let (mut tcp, resp) =
            send_head(kw, &upgrade_request(up.port(), "GET", "/socket", &task, WS)).await;
        assert_eq!(resp.status, status, "{}", resp.text());
        assert!(resp.header("upgrade").is_none(), "{}", resp.text());
        // The agent behaves as if it had switched: its frame must not reach the upstream.
        bounded("write frame", tcp.write_all(FRAME)).await.unwrap();
        let mut rest = Vec::new();
        let _ = bounded("keyward closes", tcp.read_to_end(&mut rest)).await;
        kw.saw(&String::from_utf8_lossy(&rest));
        assert!(
            !rest.windows(FRAME.len()).any(|w| w == FRAME),
            "the frame came back"
        );
        assert_eq!(up.heads().len(), 1);
        assert!(
            up.after().is_empty(),
            "bytes relayed after a {status}: {:?}",
            up.after()
        );
        let rec = kw
            .audit_where("the upgrade request", |r| r["path"] == "/socket")
            .await;
        crate::common::assert_record(&rec);
        assert_eq!(rec["status"], status, "{rec}");
        let n = kw
            .audit_records()
            .iter()
            .filter(|r| r["path"] == "/socket")
            .count();
        assert_eq!(n, 1, "{}", kw.audit_text());
        kw.assert_no_leaks().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_outside_the_intent_is_refused_before_the_upstream() {
    let up = Scripted::start(SWITCH_WS).await;
    let f = fixture_with(&up).await;
    let kw = &f.kw;
    // The task holds `/other`, not `/socket`.
    let task = kw.mint("wsbot", json!(["ws.other"])).await;
    let port = up.port();
    let cases = [
        ("GET", "/socket", 403, "route_not_in_intent"),
        ("GET", "/nothing", 403, "route_not_in_intent"),
        ("POST", "/other", 403, "method_not_allowed"),
        ("GET", "/other/../socket", 400, "ambiguous_request"),
    ];
    for (method, path, status, reason) in cases {
        let (mut tcp, resp) = send_head(kw, &upgrade_request(port, method, path, &task, WS)).await;
        let (_, rec) = kw.assert_denied_raw(&resp, status, reason).await;
        assert_eq!(rec["path"], path, "{rec}");
        // Frames after a refusal are parsed as HTTP (and refused), never relayed.
        bounded("write frame", tcp.write_all(FRAME)).await.unwrap();
        let mut rest = Vec::new();
        let _ = bounded("keyward closes", tcp.read_to_end(&mut rest)).await;
        kw.saw(&String::from_utf8_lossy(&rest));
    }
    assert_eq!(
        up.connections(),
        0,
        "the upstream was dialled for a refused upgrade"
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_websocket_upgrade_requests_are_forwarded_without_their_upgrade() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let upgrades = [
        ("GET", "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"),
        ("GET", "Connection: Upgrade\r\nUpgrade: h2c\r\n"),
        ("GET", "Connection: Upgrade\r\nUpgrade: foo/1\r\n"),
        ("GET", "Connection: Upgrade\r\nUpgrade: websocket, h2c\r\n"),
        ("GET", "Connection: Upgrade\r\nUpgrade: websocket\r\nUpgrade: h2c\r\n"),
        ("GET", "Connection: keep-alive\r\nUpgrade: websocket\r\n"),
        ("POST", "Connection: Upgrade\r\nUpgrade: websocket\r\n"),
        ("GET", "Connection: Upgrade\r\nUpgrade: TLS/1.2\r\n"),
    ];
    for (method, lines) in upgrades {
        let (_, resp) = send_head(
            kw,
            &format!(
                "{method} http://plain.test:{port}/echo HTTP/1.1\r\nHost: plain.test:{port}\r\nProxy-Authorization: {}\r\n{lines}Content-Length: 0\r\n\r\n",
                Harness::proxy_auth(&task)
            ),
        )
        .await;
        assert_eq!(resp.status, 200, "{lines:?}: {}", resp.text());
        let seen = f.plain.last();
        for h in ["upgrade", "http2-settings", "connection"] {
            assert!(
                seen.header(h).is_none(),
                "{lines:?}: `{h}` forwarded: {seen:?}"
            );
        }
        assert_eq!(seen.method, method);
    }
    assert_eq!(f.plain.hits(), upgrades.len());
    kw.assert_no_leaks().await;
}

/// An agent that asked for WebSocket gets a relay only if the upstream's `101` switches to
/// WebSocket: to `h2c`, or to nothing named, is a broken upstream (502), never a raw channel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_to_another_protocol_than_websocket_is_a_502() {
    for switch in [
        SWITCH_H2C,
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n\r\n",
    ] {
        let up = Scripted::start(switch).await;
        let f = fixture_with(&up).await;
        let kw = &f.kw;
        let task = kw.mint("wsbot", json!(["ws.socket"])).await;
        let (mut tcp, resp) =
            send_head(kw, &upgrade_request(up.port(), "GET", "/socket", &task, WS)).await;
        assert_eq!(resp.status, 502, "{switch:?}: {}", resp.text());
        assert!(resp.header("upgrade").is_none(), "{}", resp.text());
        let problem: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(problem["reason"], "upstream_bad_answer", "{problem}");
        let rec = kw.audit_for(problem["request_id"].as_str().unwrap()).await;
        assert_eq!(rec["outcome"], "unexpected_upgrade", "{rec}");
        // Nothing the agent sends next reaches the upstream as raw bytes.
        let _ = bounded("write", tcp.write_all(b"GET /admin HTTP/1.1\r\n\r\n")).await;
        let mut rest = Vec::new();
        let _ = bounded("keyward answers or closes", tcp.read_to_end(&mut rest)).await;
        assert_eq!(up.heads().len(), 1, "{switch:?}");
        kw.assert_no_leaks().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_that_switches_protocols_unasked_is_a_502_and_gets_no_tunnel() {
    let up = Scripted::start(SWITCH_H2C).await;
    let f = fixture_with(&up).await;
    let kw = &f.kw;
    let task = kw.mint("wsbot", json!(["ws.socket"])).await;
    let port = up.port();
    let asks = [
        "Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n",
        "",
    ];
    for (i, lines) in asks.into_iter().enumerate() {
        let (mut tcp, resp) =
            send_head(kw, &upgrade_request(port, "GET", "/socket", &task, lines)).await;
        assert_eq!(resp.status, 502, "{lines:?}: {}", resp.text());
        assert!(resp.header("upgrade").is_none(), "{}", resp.text());
        let problem: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        let rec = kw.audit_for(problem["request_id"].as_str().unwrap()).await;
        crate::common::assert_record(&rec);
        assert_eq!(rec["status"], 502, "{rec}");
        assert_eq!(rec["reason"], "allowed", "{rec}");
        assert_eq!(rec["outcome"], "unexpected_upgrade", "{rec}");
        // What the agent sends next is HTTP to keyward, never bytes to the upstream.
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        bounded("write", tcp.write_all(preface)).await.unwrap();
        let mut rest = Vec::new();
        let _ = bounded("keyward closes", tcp.read_to_end(&mut rest)).await;
        kw.saw(&String::from_utf8_lossy(&rest));
        assert_eq!(up.heads().len(), i + 1);
        let head = up.heads()[i].to_ascii_lowercase();
        assert!(
            !head.contains("upgrade") && !head.contains("http2-settings"),
            "{head}"
        );
        assert!(
            up.after().is_empty(),
            "bytes relayed after an unasked 101: {:?}",
            up.after()
        );
    }
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_prior_knowledge_and_upgrades_to_keyward_itself_are_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    // HTTP/2 prior knowledge on the HTTP/1.1 proxy listener.
    let mut tcp = bounded("connect", TcpStream::connect(kw.proxy_addr))
        .await
        .unwrap();
    bounded(
        "write preface",
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00"),
    )
    .await
    .unwrap();
    let mut back = Vec::new();
    let _ = bounded("keyward answers or closes", tcp.read_to_end(&mut back)).await;
    kw.saw(&String::from_utf8_lossy(&back));
    assert!(
        !back.starts_with(b"\x00")
            && !back.starts_with(b"HTTP/1.1 2")
            && !back.starts_with(b"HTTP/1.1 101"),
        "keyward spoke HTTP/2 or accepted the preface: {back:?}"
    );
    // hyper refused the preface itself, closing without an answer; the attempt still left
    // its one record, which says so (nginx's 444), not a status never sent.
    assert!(back.is_empty(), "{back:?}");
    let rec = kw
        .audit_where("the refused preface", |r| r["outcome"] == "http2_preface")
        .await;
    crate::common::assert_record(&rec);
    assert_eq!(rec["reason"], "ambiguous_request", "{rec}");
    assert_eq!(rec["status"], 444, "{rec}");
    // The same preface in two pieces, its request line and blank line first: the parser
    // alone would answer that 400 before the rest came.
    let mut tcp = bounded("connect", TcpStream::connect(kw.proxy_addr))
        .await
        .unwrap();
    bounded("write", tcp.write_all(b"PRI * HTTP/2.0\r\n\r\n"))
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let _ = bounded("write", tcp.write_all(b"SM\r\n\r\n")).await;
    let mut back = Vec::new();
    let _ = bounded("keyward closes", tcp.read_to_end(&mut back)).await;
    assert!(back.is_empty(), "{:?}", String::from_utf8_lossy(&back));
    let recs = kw.audit_count(2, |r| r["outcome"] == "http2_preface").await;
    assert!(recs.iter().all(|r| r["status"] == 444), "{recs:?}");
    // An origin-form h2c upgrade addressed to keyward itself.
    let (_, resp) = send_head(
        kw,
        &format!(
            "GET / HTTP/1.1\r\nHost: {}\r\nProxy-Authorization: {}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
            kw.proxy_addr,
            Harness::proxy_auth(&task)
        ),
    )
    .await;
    kw.assert_denied_raw(&resp, 400, "ambiguous_request").await;
    assert_eq!(f.plain.hits(), 0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_inside_a_tunnel_outside_the_intent_is_refused() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let authority = format!("secure.test:{}", f.tls.port());
    for (path, status, reason) in [
        ("/nothing", 403, "route_not_in_intent"),
        ("/repos/acme/web/labels", 403, "route_not_in_intent"),
        ("/echo/../socket", 400, "ambiguous_request"),
    ] {
        let (tcp, head) =
            connect_raw(kw.proxy_addr, &authority, Some(&Harness::proxy_auth(&task))).await;
        assert_eq!(head.status, 200);
        let mut tls = tls_over(tcp, "secure.test", &kw.ca_pem(), &[b"http/1.1"])
            .await
            .unwrap();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {authority}\r\n{WS}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        bounded("write", tls.write_all(req.as_bytes()))
            .await
            .unwrap();
        bounded("flush", tls.flush()).await.unwrap();
        let resp = read_response(&mut tls).await;
        kw.saw(&resp.text());
        kw.assert_denied_raw(&resp, status, reason).await;
    }
    assert_eq!(f.tls.hits(), 0);
    kw.assert_no_leaks().await;
}

/// `wss://` through an intercepted tunnel: relayed after a real 101, not after a 200. The
/// switching upstream also offers `h2` by ALPN, as real APIs do: the upgrade still goes over
/// an HTTP/1.1 connection (an HTTP/2 one would carry it as a plain GET).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_inside_a_tunnel_is_relayed_only_after_a_real_101() {
    let ca = TestCa::new();
    let switching =
        Scripted::start_tls_alpn(SWITCH_WS, &ca, "wss.test", &[b"h2", b"http/1.1"]).await;
    let refusing = Scripted::start_tls(OK_200, &ca, "wsok.test").await;
    // The services trust this CA from a file outside keyward's directory (an absolute path).
    let ca_dir = tempfile::tempdir().unwrap();
    let ca_path = ca_dir.path().join("wss-ca.pem");
    std::fs::write(&ca_path, &ca.pem).unwrap();
    let service = |name: &str, port: u16| {
        format!(
            "  {name}:\n    hosts: [{name}.test]\n    port: {port}\n    connect_to: 127.0.0.1:{port}\n    tls: {{ ca_file: \"{}\" }}\n    inject: {{ header: x-api-key, value: \"${{credential}}\", credential: tls_token }}\n",
            ca_path.display()
        )
    };
    let services = service("wss", switching.port()) + &service("wsok", refusing.port());
    let caps = "  wss.socket:\n    service: wss\n    risk: low\n    routes: [GET /socket]\n  wsok.socket:\n    service: wsok\n    risk: low\n    routes: [GET /socket]\n";
    let agents = "  wssbot:\n    owner: tests\n    capabilities: [wss.socket, wsok.socket]\n    max_ttl: 1h\n";
    let f = Fixture::start_with(move |p| extend_policy(&p, &services, caps, agents)).await;
    let kw = &f.kw;
    let task = kw
        .mint("wssbot", json!(["wss.socket", "wsok.socket"]))
        .await;
    for (name, up, status) in [("wss", &switching, 101u16), ("wsok", &refusing, 200)] {
        let authority = format!("{name}.test:{}", up.port());
        let (tcp, head) =
            connect_raw(kw.proxy_addr, &authority, Some(&Harness::proxy_auth(&task))).await;
        assert_eq!(head.status, 200, "{}", head.text());
        let mut tls = tls_over(tcp, &format!("{name}.test"), &kw.ca_pem(), &[b"http/1.1"])
            .await
            .unwrap();
        let req = format!(
            "GET /socket HTTP/1.1\r\nHost: {authority}\r\n{WS}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        bounded("write", tls.write_all(req.as_bytes()))
            .await
            .unwrap();
        bounded("flush", tls.flush()).await.unwrap();
        let resp = read_response(&mut tls).await;
        kw.saw(&resp.text());
        assert_eq!(resp.status, status, "{name}: {}", resp.text());
        let head = up.heads()[0].to_ascii_lowercase();
        assert!(
            head.contains(&format!(
                "x-api-key: {}",
                f.creds.tls_token.to_ascii_lowercase()
            )),
            "{head}"
        );
        bounded("write frame", tls.write_all(FRAME)).await.unwrap();
        bounded("flush", tls.flush()).await.unwrap();
        if status == 101 {
            let mut back = vec![0u8; ECHO.len()];
            bounded("read echo", tls.read_exact(&mut back))
                .await
                .unwrap();
            assert_eq!(back, ECHO);
            // The tunnel is still open, as the relay: its record waits for its end.
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let tunnel = |r: &serde_json::Value| r["method"] == "CONNECT" && r["service"] == "wss";
            assert!(
                !kw.audit_records().iter().any(tunnel),
                "the tunnel was recorded while its WebSocket was open"
            );
            drop(tls);
            let rec = kw.audit_where("the wss tunnel", tunnel).await;
            assert_eq!(rec["outcome"], "closed", "{rec}");
            assert_eq!(up.heads().len(), 1);
            continue;
        } else {
            let mut rest = Vec::new();
            let _ = bounded("keyward closes", tls.read_to_end(&mut rest)).await;
            kw.saw(&String::from_utf8_lossy(&rest));
            assert!(
                up.after().is_empty(),
                "bytes relayed after a 200: {:?}",
                up.after()
            );
        }
        assert_eq!(up.heads().len(), 1);
    }
    kw.audit_where("the wss upgrade", |r| {
        r["status"] == 101 && r["service"] == "wss"
    })
    .await;
    kw.audit_where("the refused upgrade", |r| {
        r["status"] == 200 && r["service"] == "wsok"
    })
    .await;
    kw.assert_no_leaks().await;
}

/// An upstream for one WebSocket connection: reads the upgrade's head (sent on `head`), then
/// hands the connection to `then`.
async fn ws_upstream<F, Fut>(then: F) -> (u16, tokio::sync::oneshot::Receiver<String>)
where
    F: FnOnce(TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (head_tx, head_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(bounded("ws upstream", async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut head = Vec::new();
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(tcp.read(&mut b).await.unwrap(), 1);
            head.push(b[0]);
        }
        let _ = head_tx.send(String::from_utf8_lossy(&head).into_owned());
        then(tcp).await;
    }));
    (port, head_rx)
}

/// A server's (unmasked) frame.
fn server_frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
    match u8::try_from(payload.len()) {
        Ok(n) if n < 126 => f.push(n),
        _ => {
            f.push(126);
            f.extend(u16::try_from(payload.len()).unwrap().to_be_bytes());
        }
    }
    f.extend_from_slice(payload);
    f
}

/// Reads server frames until the connection closes: (fin, opcode, payload) each.
async fn read_frames(tcp: &mut TcpStream) -> Vec<(bool, u8, Vec<u8>)> {
    let mut wire = Vec::new();
    let _ = bounded("read frames", tcp.read_to_end(&mut wire)).await;
    let mut frames = Vec::new();
    let mut rest = &wire[..];
    while rest.len() >= 2 {
        assert!(rest[1] & 0x80 == 0, "an unmasked frame");
        let (len, at) = match rest[1] & 0x7f {
            126 => (usize::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
            127 => panic!("a frame under 64 KiB"),
            n => (usize::from(n), 2),
        };
        frames.push((
            rest[0] & 0x80 != 0,
            rest[0] & 0x0f,
            rest[at..at + len].to_vec(),
        ));
        rest = &rest[at + len..];
    }
    assert!(rest.is_empty(), "a cut frame: {rest:?}");
    frames
}

/// SECURITY (I4): an upstream that echoes the upgrade's credential in WebSocket messages —
/// split across a pause, in a ping, in the close frame's reason — hands the agent
/// `[redacted]`, not the credential; the message streams (its first part arrives before the
/// upstream sends the rest), and the agent's offer of compression is not passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_reflected_in_websocket_messages_is_redacted() {
    let secret: Arc<Mutex<Vec<u8>>> = Arc::default();
    let (go_tx, go_rx) = tokio::sync::oneshot::channel::<()>();
    let s = secret.clone();
    let (port, head) = ws_upstream(move |mut tcp| async move {
        tcp.write_all(SWITCH_WS.as_bytes()).await.unwrap();
        let key = s.lock().unwrap().clone();
        let mut text = b"echo: Bearer ".to_vec();
        text.extend_from_slice(&key);
        text.extend_from_slice(b" done");
        let (first, second) = text.split_at(13 + key.len() / 2);
        // One message in two frames, the credential across them and across a pause.
        let mut prefix = "x".repeat(400).into_bytes();
        prefix.extend_from_slice(first);
        tcp.write_all(&server_frame(false, 1, &prefix))
            .await
            .unwrap();
        go_rx.await.unwrap();
        tcp.write_all(&server_frame(true, 9, &key)).await.unwrap();
        tcp.write_all(&server_frame(true, 0, second)).await.unwrap();
        let mut close = 1008u16.to_be_bytes().to_vec();
        close.extend_from_slice(&key);
        tcp.write_all(&server_frame(true, 8, &close)).await.unwrap();
    })
    .await;
    let f = fixture_on(port).await;
    let kw = &f.kw;
    *secret.lock().unwrap() = f.creds.api_token.as_bytes().to_vec();
    let task = kw.mint("wsbot", json!(["ws.socket"])).await;
    let offer =
        format!("{WS}Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n");
    let (mut tcp, resp) =
        send_head(kw, &upgrade_request(port, "GET", "/socket", &task, &offer)).await;
    assert_eq!(resp.status, 101, "{}", resp.text());
    let head = head.await.unwrap().to_ascii_lowercase();
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(!head.contains("sec-websocket-extensions"), "{head}");
    // The message's first frame arrives while the upstream still holds the rest back.
    let mut first = [0u8; 4];
    bounded("first fragment", tcp.read_exact(&mut first))
        .await
        .unwrap();
    assert_eq!(
        first[..2],
        [0x01, 126],
        "a text frame that is not the message's last"
    );
    let mut payload = vec![0u8; usize::from(u16::from_be_bytes([first[2], first[3]]))];
    bounded("first fragment", tcp.read_exact(&mut payload))
        .await
        .unwrap();
    // (All but what the redactor holds back: less than the longest spelling.)
    assert!(
        payload.len() > 200 && payload.iter().all(|&b| b == b'x'),
        "{payload:?}"
    );
    go_tx.send(()).unwrap();
    let mut frames = vec![(false, 1, payload)];
    frames.extend(read_frames(&mut tcp).await);
    let key = f.creds.api_token.as_bytes();
    for (_, _, payload) in &frames {
        assert!(
            !payload.windows(key.len()).any(|w| w == key),
            "a frame carries the credential"
        );
    }
    let text: Vec<u8> = frames
        .iter()
        .filter(|f| f.1 < 8)
        .flat_map(|f| f.2.clone())
        .collect();
    let mut want = "x".repeat(400).into_bytes();
    want.extend_from_slice(b"echo: Bearer [redacted] done");
    assert_eq!(
        String::from_utf8_lossy(&text),
        String::from_utf8_lossy(&want)
    );
    let ops: Vec<(bool, u8)> = frames.iter().map(|f| (f.0, f.1)).collect();
    assert_eq!(
        ops.iter().filter(|o| o.1 == 0).count(),
        ops.len() - 3,
        "{ops:?}"
    );
    assert!(
        ops.contains(&(true, 9)) && ops.contains(&(true, 8)),
        "{ops:?}"
    );
    assert!(ops.iter().rfind(|o| o.1 < 8).unwrap().0, "{ops:?}");
    let ping = frames.iter().find(|f| f.1 == 9).unwrap();
    assert_eq!(ping.2, b"[redacted]");
    let close = frames.iter().find(|f| f.1 == 8).unwrap();
    assert_eq!(close.2, b"\x03\xf0[redacted]");
    drop(tcp);
    let rec = kw
        .audit_where("the websocket", |r| r["status"] == 101)
        .await;
    crate::common::assert_record(&rec);
    assert_eq!(rec["outcome"], "completed", "{rec}");
    assert_eq!(
        kw.metric_settled("keyward_secrets_redacted_total{service=\"ws\"}", 3.0)
            .await,
        Some(3.0)
    );
    kw.assert_no_leaks().await;
}

/// An upstream whose frames keyward cannot read for redaction (a masked frame, a compressed
/// one) ends the relay, recorded as such; one that agrees to an extension keyward did not
/// offer gets no relay at all (502).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_frames_keyward_cannot_redact_end_the_relay() {
    for (frame, label) in [
        (FRAME.to_vec(), "masked"),
        (vec![0xc1, 0x01, b'x'], "compressed"),
    ] {
        let (port, _head) = ws_upstream(move |mut tcp| async move {
            tcp.write_all(SWITCH_WS.as_bytes()).await.unwrap();
            tcp.write_all(&server_frame(true, 1, b"fine"))
                .await
                .unwrap();
            tcp.write_all(&frame).await.unwrap();
            // Held open: keyward, not the upstream, ends the relay.
            tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        })
        .await;
        let f = fixture_on(port).await;
        let kw = &f.kw;
        let task = kw.mint("wsbot", json!(["ws.socket"])).await;
        let (mut tcp, resp) =
            send_head(kw, &upgrade_request(port, "GET", "/socket", &task, WS)).await;
        assert_eq!(resp.status, 101, "{label}: {}", resp.text());
        let mut wire = Vec::new();
        bounded("keyward closes", tcp.read_to_end(&mut wire))
            .await
            .unwrap();
        assert_eq!(wire, server_frame(true, 1, b"fine"), "{label}");
        let rec = kw
            .audit_where("the websocket", |r| r["status"] == 101)
            .await;
        assert_eq!(rec["outcome"], "websocket_protocol_error", "{label}: {rec}");
        // An upstream failure, counted as one.
        let series = "keyward_upstream_errors_total{kind=\"protocol\",service=\"ws\"}";
        assert_eq!(kw.metric(series).await, Some(1.0), "{label}");
    }

    let switch_deflate = SWITCH_WS.replace(
        "\r\n\r\n",
        "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
    );
    let up = Scripted::start(&switch_deflate).await;
    let f = fixture_with(&up).await;
    let kw = &f.kw;
    let task = kw.mint("wsbot", json!(["ws.socket"])).await;
    let (_tcp, resp) =
        send_head(kw, &upgrade_request(up.port(), "GET", "/socket", &task, WS)).await;
    assert_eq!(resp.status, 502, "{}", resp.text());
    let rec = kw
        .audit_where("the refused upgrade", |r| r["status"] == 502)
        .await;
    assert_eq!(rec["outcome"], "websocket_extension", "{rec}");
    kw.assert_no_leaks().await;
}

/// Inside a tunnel, bytes of the other protocol than ALPN chose end the connection unanswered,
/// and each such attempt still leaves its one record, naming the tunnel's task and where it
/// led (SECURITY I6): however the preface is split, and after an HTTP/1.1 request too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_of_the_other_protocol_in_a_tunnel_are_recorded() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let port = f.tls.port();
    let h1 = format!("GET /repos/acme/web/issues HTTP/1.1\r\nHost: secure.test:{port}\r\n\r\n");
    let preface: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";
    let (line, rest) = preface.split_at(16); // "PRI * HTTP/2.0\r\n" alone, then the rest
                                             // (ALPN, what is written with a pause after each piece, whether a request comes first)
    type Case<'a> = (&'a [u8], &'a [&'a [u8]], bool);
    let cases: [Case; 4] = [
        (b"http/1.1", &[preface], false),
        (b"h2", &[h1.as_bytes()], false),
        (b"http/1.1", &[line, rest], false),
        (b"http/1.1", &[preface], true),
    ];
    for (alpn, writes, request_first) in cases {
        let label = format!("{} {writes:?}", String::from_utf8_lossy(alpn));
        let mut tls = crate::common::tunnel_tls(&f, &task, "secure.test", &[alpn]).await;
        if request_first {
            bounded("write", tls.write_all(h1.as_bytes()))
                .await
                .unwrap();
            let answer = crate::common::read_response(&mut tls).await;
            assert_eq!(answer.status, 200, "{label}: {}", answer.text());
        }
        for bytes in writes {
            bounded("write", tls.write_all(bytes)).await.unwrap();
            bounded("flush", tls.flush()).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let mut back = Vec::new();
        let _ = bounded("the tunnel to close", tls.read_to_end(&mut back)).await;
        assert!(
            !back.starts_with(b"HTTP/1.1"),
            "{label}: answered as HTTP/1.1: {:?}",
            String::from_utf8_lossy(&back)
        );
    }
    let connect = kw
        .audit_where("the tunnel", |r| r["method"] == "CONNECT")
        .await;
    let recs = kw
        .audit_count(4, |r| r["outcome"] == "not_alpn_protocol")
        .await;
    for rec in &recs {
        crate::common::assert_record(rec);
        assert_eq!(rec["reason"], "ambiguous_request", "{rec}");
        assert_eq!(rec["decision"], "deny", "{rec}");
        assert_eq!(rec["status"], 444, "{rec}");
        assert_eq!(rec["task"], task.id.as_str(), "{rec}");
        assert_eq!(rec["scheme"], "https", "{rec}");
        assert_eq!(rec["host"], "secure.test", "{rec}");
        assert_eq!(rec["port"], port, "{rec}");
        assert_eq!(rec["service"], connect["service"], "{rec}");
        assert!(rec["service"].is_string(), "{rec}");
    }
    assert_eq!(
        f.tls.hits(),
        1,
        "only the one HTTP/1.1 request reached the upstream"
    );
    kw.assert_no_leaks().await;
}

/// A WebSocket relay is an open channel: a reload that no longer allows its upgrade (the
/// route taken out of the capability, the task still active) closes it, outcome
/// `policy_changed`; a reload that still allows it leaves it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_no_longer_allows_a_websocket_closes_its_relay() {
    let up = Scripted::start(SWITCH_WS).await;
    let f = fixture_with(&up).await;
    let kw = &f.kw;
    let task = kw.mint("wsbot", json!(["ws.socket"])).await;
    let (mut tcp, resp) =
        send_head(kw, &upgrade_request(up.port(), "GET", "/socket", &task, WS)).await;
    assert_eq!(resp.status, 101, "{}", resp.text());
    async fn exchange(tcp: &mut TcpStream) {
        bounded("write frame", tcp.write_all(FRAME)).await.unwrap();
        let mut back = vec![0u8; ECHO.len()];
        bounded("read echo", tcp.read_exact(&mut back))
            .await
            .unwrap();
        assert_eq!(back, ECHO);
    }
    exchange(&mut tcp).await;
    let reload = || async {
        let (status, v) = kw.admin(http::Method::POST, "/v1/reload", None).await;
        assert_eq!(status, 200, "{v}");
    };
    reload().await;
    exchange(&mut tcp).await;
    take_the_socket_route_out(kw).await;
    closed_by_the_reload(kw, &mut tcp).await;
    let (_, t) = kw
        .admin(http::Method::GET, &format!("/v1/tasks/{}", task.id), None)
        .await;
    assert_eq!(t["status"], "active", "{t}");
    kw.assert_no_leaks().await;
}

/// A reload that lands while an upgrade waits for its `101` is not missed: the relay that
/// starts after it looks at the policy first, and ends at once when its upgrade would no
/// longer be allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_an_upgrade_closes_the_relay_it_no_longer_allows() {
    let (answer, answered) = tokio::sync::oneshot::channel::<()>();
    let (port, head) = ws_upstream(move |mut tcp| async move {
        let _ = answered.await;
        tcp.write_all(SWITCH_WS.as_bytes()).await.unwrap();
        // Holds the relay open from its side.
        let mut sink = Vec::new();
        let _ = tcp.read_to_end(&mut sink).await;
    })
    .await;
    let f = fixture_on(port).await;
    let kw = &f.kw;
    let task = kw.mint("wsbot", json!(["ws.socket"])).await;
    let mut tcp = bounded("connect", TcpStream::connect(kw.proxy_addr))
        .await
        .unwrap();
    let upgrade = upgrade_request(port, "GET", "/socket", &task, WS);
    bounded("write", tcp.write_all(upgrade.as_bytes()))
        .await
        .unwrap();
    bounded("the upstream sees the upgrade", head)
        .await
        .unwrap();
    take_the_socket_route_out(kw).await;
    answer.send(()).unwrap();
    let resp = read_response(&mut tcp).await;
    assert_eq!(resp.status, 101, "{}", resp.text());
    closed_by_the_reload(kw, &mut tcp).await;
    kw.assert_no_leaks().await;
}

/// Rewrites `GET /socket` in the policy to `GET /socket/v2` and reloads it.
async fn take_the_socket_route_out(kw: &Harness) {
    let original = std::fs::read_to_string(&kw.policy_path).unwrap();
    let narrowed = original.replacen("routes: [GET /socket]", "routes: [GET /socket/v2]", 1);
    assert_ne!(narrowed, original);
    std::fs::write(&kw.policy_path, &narrowed).unwrap();
    let (status, v) = kw.admin(http::Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200, "{v}");
}

/// Waits for the relay on `tcp` to close and checks its record says the reload closed it.
async fn closed_by_the_reload(kw: &Harness, tcp: &mut TcpStream) {
    let mut rest = Vec::new();
    let _ = bounded("the relay to close", tcp.read_to_end(&mut rest)).await;
    let rec = kw
        .audit_where("the websocket", |r| r["status"] == 101)
        .await;
    assert_eq!(rec["outcome"], "policy_changed", "{rec}");
}
