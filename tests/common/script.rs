//! A scripted raw HTTP/1.1 upstream for protocol edges hyper would not produce: it reads each
//! request off the socket (head, then a Content-Length or chunked body, trailers included) and
//! writes back exactly the bytes a script returns — desynced framing, a second response, tiny
//! frames, trailers, a redirect, or nothing at all. Records every request with the number of the
//! connection it came on. Stops when dropped.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

/// One request as the scripted upstream read it, raw.
#[derive(Clone, Debug)]
pub struct RawSeen {
    /// 0, 1, 2, … in accept order.
    pub conn: usize,
    /// The request line and headers, without the final blank line.
    pub head: String,
    /// The body, de-chunked; trailers (if any) are in `trailers`.
    pub body: Vec<u8>,
    pub trailers: String,
}

impl RawSeen {
    pub fn request_line(&self) -> &str {
        self.head.lines().next().unwrap_or("")
    }

    /// All values of header `name` (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.head
            .split("\r\n")
            .skip(1)
            .filter_map(|l| l.split_once(':'))
            .filter(|(n, _)| n.trim().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.trim().to_string())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.header_all(name).into_iter().next()
    }
}

/// What the scripted upstream does with one request.
pub struct Reply {
    /// Written in order, each flushed on its own, `gap` apart.
    pub parts: Vec<Vec<u8>>,
    pub gap: Duration,
    pub after: After,
}

/// What happens to the connection after a reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum After {
    /// Read the next request.
    KeepAlive,
    /// Close the connection.
    Close,
    /// Keep the connection open and never read or write again (an upstream that hangs).
    Hang,
}

impl Reply {
    /// One write, then keep the connection.
    pub fn bytes(b: impl Into<Vec<u8>>) -> Reply {
        Reply {
            parts: vec![b.into()],
            gap: Duration::ZERO,
            after: After::KeepAlive,
        }
    }

    /// Several writes `gap` apart, then keep the connection.
    pub fn frames(parts: Vec<Vec<u8>>, gap: Duration) -> Reply {
        Reply {
            parts,
            gap,
            after: After::KeepAlive,
        }
    }

    /// Never answers.
    pub fn hang() -> Reply {
        Reply {
            parts: Vec::new(),
            gap: Duration::ZERO,
            after: After::Hang,
        }
    }

    pub fn then(mut self, after: After) -> Reply {
        self.after = after;
        self
    }
}

type Script = Arc<dyn Fn(&RawSeen) -> Reply + Send + Sync>;

/// The scripted upstream (plain TCP).
pub struct ScriptUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<RawSeen>>>,
    conns: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Drop for ScriptUpstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl ScriptUpstream {
    pub async fn start(script: impl Fn(&RawSeen) -> Reply + Send + Sync + 'static) -> Self {
        Self::spawn(None, Arc::new(script)).await
    }

    /// The same over TLS, with a certificate for `names` signed by `ca` (ALPN http/1.1 only).
    pub async fn tls(
        ca: &super::TestCa,
        names: &[&str],
        script: impl Fn(&RawSeen) -> Reply + Send + Sync + 'static,
    ) -> Self {
        let (cert, key) = ca.leaf(names);
        let mut cfg = rustls::ServerConfig::builder_with_provider(super::ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        Self::spawn(Some(acceptor), Arc::new(script)).await
    }

    async fn spawn(tls: Option<tokio_rustls::TlsAcceptor>, script: Script) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<RawSeen>>> = Arc::default();
        let conns: Arc<AtomicUsize> = Arc::default();
        let (seen2, conns2) = (seen.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let conn = conns2.fetch_add(1, Ordering::SeqCst);
                let (seen, script) = (seen2.clone(), script.clone());
                match tls.clone() {
                    None => {
                        tokio::spawn(serve(tcp, conn, seen, script));
                    }
                    Some(acceptor) => {
                        tokio::spawn(async move {
                            if let Ok(Ok(s)) =
                                tokio::time::timeout(super::NET_TIMEOUT, acceptor.accept(tcp)).await
                            {
                                serve(s, conn, seen, script).await;
                            }
                        });
                    }
                }
            }
        });
        ScriptUpstream {
            addr,
            seen,
            conns,
            accept,
        }
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn seen(&self) -> Vec<RawSeen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.conns.load(Ordering::SeqCst)
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    mut tcp: S,
    conn: usize,
    seen: Arc<Mutex<Vec<RawSeen>>>,
    script: Script,
) {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        let Some(req) = read_request(&mut tcp, &mut buf, conn).await else {
            return;
        };
        seen.lock().unwrap().push(req.clone());
        let reply = script(&req);
        for (i, part) in reply.parts.iter().enumerate() {
            if i > 0 && !reply.gap.is_zero() {
                tokio::time::sleep(reply.gap).await;
            }
            if tcp.write_all(part).await.is_err() || tcp.flush().await.is_err() {
                return;
            }
        }
        match reply.after {
            After::KeepAlive => {}
            After::Close => return,
            After::Hang => {
                // Hold the socket until the peer goes away (or the test ends).
                let mut sink = [0u8; 1024];
                while matches!(tcp.read(&mut sink).await, Ok(n) if n > 0) {}
                return;
            }
        }
    }
}

async fn fill<S: AsyncRead + Unpin>(tcp: &mut S, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match tcp.read(&mut chunk).await {
        Ok(n) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads up to and including the next CRLF; `None` at EOF.
async fn line<S: AsyncRead + Unpin>(tcp: &mut S, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    loop {
        if let Some(i) = find(buf, b"\r\n") {
            let l: Vec<u8> = buf.drain(..i + 2).collect();
            return Some(l[..i].to_vec());
        }
        if !fill(tcp, buf).await {
            return None;
        }
    }
}

async fn read_request<S: AsyncRead + Unpin>(
    tcp: &mut S,
    buf: &mut Vec<u8>,
    conn: usize,
) -> Option<RawSeen> {
    let end = loop {
        if let Some(i) = find(buf, b"\r\n\r\n") {
            break i;
        }
        if !fill(tcp, buf).await {
            return None;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    buf.drain(..end + 4);
    let mut req = RawSeen {
        conn,
        head,
        body: Vec::new(),
        trailers: String::new(),
    };
    let chunked = req
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        loop {
            let size_line = line(tcp, buf).await?;
            let text = String::from_utf8_lossy(&size_line);
            let size = usize::from_str_radix(text.split(';').next()?.trim(), 16).ok()?;
            if size == 0 {
                loop {
                    let t = line(tcp, buf).await?;
                    if t.is_empty() {
                        return Some(req);
                    }
                    req.trailers.push_str(&String::from_utf8_lossy(&t));
                    req.trailers.push_str("\r\n");
                }
            }
            while buf.len() < size + 2 {
                if !fill(tcp, buf).await {
                    return None;
                }
            }
            req.body.extend_from_slice(&buf[..size]);
            buf.drain(..size + 2);
        }
    }
    let len = req
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    while buf.len() < len {
        if !fill(tcp, buf).await {
            return None;
        }
    }
    req.body = buf.drain(..len).collect();
    Some(req)
}

/// `HTTP/1.1 200 OK` with `headers` (each `Name: value`) and a Content-Length body.
pub fn http_response(status: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = format!("HTTP/1.1 {status}\r\n");
    for h in headers {
        out.push_str(h);
        out.push_str("\r\n");
    }
    out.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

/// The standard fixture with its plain services moved to `script`, and a task of `bot` that
/// reads them (`plain.issues.read`): how a test of an upstream's odd answers starts.
pub async fn plain_fixture_at(script: &ScriptUpstream) -> (super::Fixture, super::Task) {
    let port = script.port();
    let f = super::Fixture::start_with(|p| plain_services_at(p, port)).await;
    let task =
        f.kw.mint("bot", serde_json::json!(["plain.issues.read"]))
            .await;
    (f, task)
}

/// The standard policy with every service of the plain upstream (`plain.test`, `query.test`,
/// `basic.test`, `localhost`, `gone.test`) moved to `port` (a `ScriptUpstream`).
pub fn plain_services_at(policy: String, port: u16) -> String {
    let old = policy
        .split("connect_to: 127.0.0.1:")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap()
        .to_string();
    policy
        .replace(&format!("port: {old}\n"), &format!("port: {port}\n"))
        .replace(
            &format!("127.0.0.1:{old}\n"),
            &format!("127.0.0.1:{port}\n"),
        )
}

/// The standard policy with every service of the TLS upstream (`secure.test`, `other.test`, …)
/// moved to `port` (a TLS `ScriptUpstream`).
pub fn tls_services_at(policy: String, port: u16) -> String {
    let old = policy
        .split("  secure:\n    hosts: [secure.test]\n    port: ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .unwrap()
        .to_string();
    policy
        .replace(&format!("port: {old}\n"), &format!("port: {port}\n"))
        .replace(
            &format!("127.0.0.1:{old}\n"),
            &format!("127.0.0.1:{port}\n"),
        )
}
