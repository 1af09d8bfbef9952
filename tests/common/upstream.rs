//! Upstreams that report what they received: a test CA (rcgen) for their certificates, an
//! echo server over plain TCP or TLS (h1 and h2), and a blind TCP echo for passthrough tunnels.
//! They stop when dropped.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::{ring, NET_TIMEOUT};

// ---------------------------------------------------------------------------------------------
// Test CA for upstreams (rcgen)

/// A CA that signs the upstreams' certificates; keyward trusts it through `tls.ca_file`.
pub struct TestCa {
    pub pem: String,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keyward test upstream CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// A server certificate for `names` (DNS names or IP literals).
    pub fn leaf(&self, names: &[&str]) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Echo upstream

/// One request as the upstream received it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    /// Path and query, as received.
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub version: String,
    pub body: Vec<u8>,
}

impl Seen {
    /// All values of header `name` (case-insensitive).
    pub fn header_all(&self, name: &str) -> Vec<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
            .collect()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.header_all(name).into_iter().next()
    }
}

/// An upstream that answers with JSON `{method, path, headers, version, body}` and records
/// every request. `/sse` streams three events 200 ms apart; `/reflect-auth` sends back the
/// request's `Authorization` (or `x-api-key`) value in its body and a header.
pub struct Upstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    accept: JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl Upstream {
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Everything received so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn hits(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The last request received; fails if none was.
    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream received no request")
    }

    /// Plain-TCP upstream (HTTP/1.1 and h2c prior knowledge).
    pub async fn plain() -> Upstream {
        Self::spawn(None).await
    }

    /// TLS upstream with a certificate for `names` signed by `ca`; ALPN h2 and http/1.1.
    pub async fn tls(ca: &TestCa, names: &[&str]) -> Upstream {
        let (cert, key) = ca.leaf(names);
        let mut cfg = rustls::ServerConfig::builder_with_provider(ring())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap();
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self::spawn(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))).await
    }

    async fn spawn(tls: Option<tokio_rustls::TlsAcceptor>) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen2 = seen.clone();
        let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let accepted = connections.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                accepted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let seen = seen2.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| echo(req, seen.clone()));
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    match tls {
                        Some(acceptor) => {
                            if let Ok(Ok(stream)) =
                                tokio::time::timeout(NET_TIMEOUT, acceptor.accept(tcp)).await
                            {
                                let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                            }
                        }
                        None => {
                            let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                        }
                    }
                });
            }
        });
        Upstream {
            addr,
            seen,
            connections,
            accept,
        }
    }
}

type EchoBody = UnsyncBoxBody<Bytes, Infallible>;

fn full(body: impl Into<Bytes>) -> EchoBody {
    Full::new(body.into()).boxed_unsync()
}

async fn echo(
    req: Request<Incoming>,
    seen: Arc<Mutex<Vec<Seen>>>,
) -> Result<Response<EchoBody>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    let headers: Vec<(String, String)> = parts
        .headers
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let record = Seen {
        method: parts.method.as_str().to_string(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default(),
        headers,
        version: format!("{:?}", parts.version),
        body,
    };
    seen.lock().unwrap().push(record.clone());

    match parts.uri.path() {
        "/slow" => {
            // Answers late enough for a test to act while the request is in flight.
            tokio::time::sleep(Duration::from_millis(600)).await;
            Ok(Response::new(full("slow answer\n")))
        }
        "/stall" => {
            // Answers only after shutdown's drain (10 s) has run out.
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(Response::new(full("too late\n")))
        }
        // A stream that outlasts shutdown's drain: one event every 100 ms for 60 s.
        "/endless" => Ok(ticks(600, Duration::from_millis(100))),
        // A long stream: one event every 50 ms for 10 s, for tests that act mid-stream.
        "/ticks" => Ok(ticks(200, Duration::from_millis(50))),
        "/sse" => {
            let events = futures_util::stream::unfold(0u32, |i| async move {
                if i >= 3 {
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                let frame = Frame::data(Bytes::from(format!("data: event {}\n\n", i + 1)));
                Some((Ok::<_, Infallible>(frame), i + 1))
            });
            let resp = Response::builder()
                .header("content-type", "text/event-stream")
                .header("cache-control", "no-cache")
                .body(StreamBody::new(events).boxed_unsync())
                .unwrap();
            Ok(resp)
        }
        "/big" => {
            // 64 MiB in 64 KiB frames (more than loopback socket buffers absorb), for tests of
            // readers that stop reading.
            let frames =
                futures_util::stream::iter((0..1024).map(|_| {
                    Ok::<_, Infallible>(Frame::data(Bytes::from_static(&[b'x'; 64 * 1024])))
                }));
            Ok(Response::new(StreamBody::new(frames).boxed_unsync()))
        }
        "/reflect-auth-base64" => {
            // The credential header base64-encoded behind 0, 1 and 2 more bytes, in both
            // alphabets, one per line: every alignment of the value inside the encoding.
            use base64::Engine as _;
            let value = record.header("authorization").unwrap_or_default();
            let mut body = String::new();
            for prefix in ["", "x", "xy"] {
                let text = format!("{prefix}{value}");
                for engine in [
                    &base64::engine::general_purpose::STANDARD,
                    &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                ] {
                    body.push_str(&engine.encode(&text));
                    body.push('\n');
                }
            }
            Ok(Response::new(full(body)))
        }
        "/reflect-auth" => {
            let value = record
                .header("authorization")
                .or_else(|| record.header("x-api-key"))
                .unwrap_or_default();
            let resp = Response::builder()
                .header("content-type", "text/plain")
                .header("x-echo-auth", value.clone())
                .body(full(format!("you sent: {value}\n")))
                .unwrap();
            Ok(resp)
        }
        _ => {
            let out = json!({
                "method": record.method,
                "path": record.path,
                "headers": record.headers.iter().map(|(n, v)| json!([n, v])).collect::<Vec<_>>(),
                "version": record.version,
                "body": String::from_utf8_lossy(&record.body),
            });
            let resp = Response::builder()
                .header("content-type", "application/json")
                .body(full(serde_json::to_vec(&out).unwrap()))
                .unwrap();
            Ok(resp)
        }
    }
}

/// A blind TCP echo (for passthrough tunnels): every byte read is written back.
pub struct TcpEcho {
    pub addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl Drop for TcpEcho {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl TcpEcho {
    pub async fn start() -> TcpEcho {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = tcp.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        TcpEcho { addr, accept }
    }
}

impl TestCa {
    /// A server certificate for `names` with `edit` applied to its parameters first (an
    /// expired validity period, another key usage, ...).
    pub fn leaf_with(
        &self,
        names: &[&str],
        edit: impl FnOnce(&mut rcgen::CertificateParams),
    ) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(sans).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0]);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        edit(&mut params);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            cert.der().clone(),
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

/// An event stream of `count` events `every` apart (`data: tick N`), the first at once.
fn ticks(count: u32, every: Duration) -> Response<EchoBody> {
    let events = futures_util::stream::unfold(0u32, move |i| async move {
        if i >= count {
            return None;
        }
        if i > 0 {
            tokio::time::sleep(every).await;
        }
        let frame = Frame::data(Bytes::from(format!("data: tick {}\n\n", i + 1)));
        Some((Ok::<_, Infallible>(frame), i + 1))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(StreamBody::new(events).boxed_unsync())
        .unwrap()
}
