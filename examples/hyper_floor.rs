//! The floor of a forward proxy built on keyward's HTTP stack, for the shared harness's plain-HTTP
//! scenarios (A, B): hyper's HTTP/1 server and client, a per-process pool of upstream
//! connections, tokio's current-thread runtime and mimalloc, as `keyward serve` uses them on one
//! CPU — and nothing else. No authentication, policy, injection, redaction, audit or metrics;
//! every request goes to the one upstream named on the command line.
//!
//! It exists to measure what the stack alone costs per request on the harness's proxy core, so
//! that keyward's own share can be told from hyper's, tokio's and the kernel's
//! (`benches/README.md`, "What stands between keyward and 3× squid per core"). Not a product.
//!
//! ```sh
//! cargo build --release --example hyper_floor
//! target/release/examples/hyper_floor 127.0.0.1:14000 127.0.0.1:18080
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http::{header, Request, Response, StatusCode, Uri};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

struct Upstream {
    addr: SocketAddr,
    idle: Mutex<Vec<SendRequest<Incoming>>>,
}

impl Upstream {
    /// An idle connection that is still usable, else a new one; `None` if the upstream cannot
    /// be reached (answered 502).
    async fn sender(&self) -> Option<SendRequest<Incoming>> {
        loop {
            let taken = self.idle.lock().map(|mut idle| idle.pop()).ok().flatten();
            let Some(mut sender) = taken else { break };
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
        let stream = TcpStream::connect(self.addr).await.ok()?;
        let _ = stream.set_nodelay(true);
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .ok()?;
        tokio::spawn(conn);
        Some(sender)
    }

    fn put_back(&self, sender: SendRequest<Incoming>) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.push(sender);
        }
    }
}

async fn forward(up: Arc<Upstream>, mut req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let Ok(origin_form) = path.parse::<Uri>() else {
        return status(StatusCode::BAD_REQUEST);
    };
    *req.uri_mut() = origin_form;
    let headers = req.headers_mut();
    headers.remove(header::PROXY_AUTHORIZATION);
    headers.remove("proxy-connection");
    let Some(mut sender) = up.sender().await else {
        return status(StatusCode::BAD_GATEWAY);
    };
    let sent = sender.send_request(req).await;
    up.put_back(sender);
    match sent {
        Ok(resp) => resp.map(|b| b.boxed_unsync()),
        Err(_) => status(StatusCode::BAD_GATEWAY),
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
    *resp.status_mut() = code;
    resp
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: hyper_floor LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let parse = |s: &str| -> std::io::Result<SocketAddr> {
        s.parse()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let up = Arc::new(Upstream {
        addr: parse(&upstream)?,
        idle: Mutex::new(Vec::new()),
    });
    let listen = parse(&listen)?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async move {
            let listener = TcpListener::bind(listen).await?;
            loop {
                let (stream, _) = listener.accept().await?;
                let _ = stream.set_nodelay(true);
                let up = up.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let up = up.clone();
                        async move { Ok::<_, Infallible>(forward(up, req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .keep_alive(true)
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
}
