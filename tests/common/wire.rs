//! Raw sockets for protocol edges: one HTTP/1.1 exchange, a response parser, CONNECT by hand,
//! a TLS client over a tunnel, and hyper client connections over it.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{bounded, ring};

// ---------------------------------------------------------------------------------------------
// Raw sockets

/// A response read off a raw socket.
#[derive(Debug)]
pub struct RawResp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResp {
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    }

    pub fn text(&self) -> String {
        format!(
            "{} {:?}\n{}",
            self.status,
            self.headers,
            String::from_utf8_lossy(&self.body)
        )
    }
}

/// Writes `request` to `addr` and reads until the peer closes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> RawResp {
    let mut tcp = bounded("connect", TcpStream::connect(addr)).await.unwrap();
    bounded("write", tcp.write_all(request)).await.unwrap();
    let mut buf = Vec::new();
    bounded("read to EOF", tcp.read_to_end(&mut buf))
        .await
        .unwrap();
    parse_response(&buf)
}

/// Parses one HTTP/1.1 response (Content-Length, chunked, or to EOF).
pub fn parse_response(buf: &[u8]) -> RawResp {
    let end = find(buf, b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(buf)));
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &buf[end + 4..];
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else if let Some(len) = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        rest[..len.min(rest.len())].to_vec()
    } else {
        rest.to_vec()
    };
    RawResp {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = find(data, b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..eol]);
        let size =
            usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        data = &data[eol + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[(size + 2).min(data.len())..];
    }
    out
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Reads exactly one HTTP/1.1 response from `io` (Content-Length or chunked framing), leaving
/// the connection open for the next one.
pub async fn read_response<R: AsyncRead + Unpin>(io: &mut R) -> RawResp {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        let n = bounded("response head", io.read(&mut byte)).await.unwrap();
        assert_eq!(
            n,
            1,
            "connection closed in a response head: {:?}",
            String::from_utf8_lossy(&buf)
        );
        buf.push(byte[0]);
    }
    let head = parse_response(&buf);
    let chunked = head
        .header("transfer-encoding")
        .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    if chunked {
        while !buf.ends_with(b"\r\n0\r\n\r\n") && !buf.ends_with(b"\r\n\r\n0\r\n\r\n") {
            let n = bounded("chunked body", io.read(&mut byte)).await.unwrap();
            assert_eq!(n, 1, "connection closed in a chunked body");
            buf.push(byte[0]);
        }
    } else if let Some(len) = head
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut body = vec![0u8; len];
        bounded("body", io.read_exact(&mut body)).await.unwrap();
        buf.extend_from_slice(&body);
    }
    parse_response(&buf)
}

/// Sends `CONNECT authority` (with `Proxy-Authorization: auth` when given) and reads the
/// response head byte by byte, so nothing after it is consumed. Returns the stream and the
/// head (with the body of a refusal, read by Content-Length).
pub async fn connect_raw(
    proxy: SocketAddr,
    authority: &str,
    auth: Option<&str>,
) -> (TcpStream, RawResp) {
    let mut tcp = bounded("connect", TcpStream::connect(proxy)).await.unwrap();
    let mut req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if let Some(a) = auth {
        req.push_str(&format!("Proxy-Authorization: {a}\r\n"));
    }
    req.push_str("\r\n");
    bounded("write CONNECT", tcp.write_all(req.as_bytes()))
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = bounded("read CONNECT answer", tcp.read(&mut b))
            .await
            .unwrap();
        assert!(
            n == 1,
            "proxy closed during the CONNECT answer: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(b[0]);
    }
    let mut resp = parse_response(&head);
    if resp.status != 200 {
        if let Some(len) = resp
            .header("content-length")
            .and_then(|v| v.parse::<usize>().ok())
        {
            let mut body = vec![0u8; len];
            bounded("read CONNECT refusal body", tcp.read_exact(&mut body))
                .await
                .unwrap();
            resp.body = body;
        }
    }
    (tcp, resp)
}

/// A TLS client over `io` for `sni`, trusting only `ca_pem`, offering `alpn`.
pub async fn tls_over<IO>(
    io: IO,
    sni: &str,
    ca_pem: &[u8],
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<IO>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(ring())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    let name = ServerName::try_from(sni.to_string()).unwrap();
    bounded("TLS handshake", connector.connect(name, io)).await
}

/// An HTTP/1.1 client connection over `io` (keep-alive; Host is whatever the test sets).
pub async fn h1_over<IO>(io: IO) -> hyper::client::conn::http1::SendRequest<Full<Bytes>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = bounded(
        "h1 handshake",
        hyper::client::conn::http1::handshake(TokioIo::new(io)),
    )
    .await
    .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// Sends one request on an h1 connection and reads the whole response.
pub async fn h1_send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> RawResp {
    bounded("h1 ready", sender.ready()).await.unwrap();
    let resp = bounded("h1 response", sender.send_request(req))
        .await
        .unwrap();
    collect(resp).await
}

/// An HTTP/2 client connection over `io` (negotiate `h2` by ALPN first).
pub async fn h2_over<IO>(io: IO) -> hyper::client::conn::http2::SendRequest<Full<Bytes>>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = bounded(
        "h2 handshake",
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)),
    )
    .await
    .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    sender
}

/// Sends one request on an h2 connection and reads the whole response.
pub async fn h2_send(
    sender: &mut hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    req: Request<Full<Bytes>>,
) -> RawResp {
    bounded("h2 ready", sender.ready()).await.unwrap();
    let resp = bounded("h2 response", sender.send_request(req))
        .await
        .unwrap();
    collect(resp).await
}

async fn collect(resp: http::Response<Incoming>) -> RawResp {
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = bounded("response body", resp.into_body().collect())
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    RawResp {
        status,
        headers,
        body,
    }
}

/// Writes a hand-made request head (a CONNECT with any authority and header lines, or any
/// request to be answered on a connection kept open) and reads one response head byte by byte,
/// then its body by Content-Length, so nothing after it is consumed. EOF before a whole head
/// is returned as status 0 with the bytes read so far as the body.
pub async fn exchange_head(proxy: SocketAddr, request: &[u8]) -> (TcpStream, RawResp) {
    let mut tcp = bounded("connect", TcpStream::connect(proxy)).await.unwrap();
    bounded("write request", tcp.write_all(request))
        .await
        .unwrap();
    let resp = read_head_and_body(&mut tcp).await;
    (tcp, resp)
}

/// For a hand-written upstream: reads until a whole request head has arrived (what follows
/// it, a body, may be read too). `false` when the peer closes or fails first.
pub async fn read_request_head<R: AsyncRead + Unpin>(io: &mut R) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match io.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// Reads one response head (byte by byte) and its Content-Length body from `io`; status 0 when
/// the peer closes first.
pub async fn read_head_and_body<R: AsyncRead + Unpin>(io: &mut R) -> RawResp {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        match bounded("read a response head", io.read(&mut b)).await {
            Ok(1) => head.push(b[0]),
            _ => {
                return RawResp {
                    status: 0,
                    headers: Vec::new(),
                    body: head,
                }
            }
        }
    }
    let mut resp = parse_response(&head);
    if let Some(len) = resp
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut body = vec![0u8; len];
        bounded("read a response body", io.read_exact(&mut body))
            .await
            .unwrap();
        resp.body = body;
    }
    resp
}
