//! One agent connection: the HTTP/1.1 proxy listener's connections (with upgrades, for CONNECT)
//! and intercepted TLS connections (HTTP/1.1 or HTTP/2 by ALPN). Time-boxes request heads and
//! bounds HTTP/2 streams; never time-boxes a streaming body.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::proxy::body::ProxyBody;
use crate::state::State;

/// Serves one connection of the plain proxy listener until it closes or keyward shuts down.
pub async fn serve_plain<S>(state: &State, stream: TcpStream, svc: S)
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    let _ = stream.set_nodelay(true);
    let settings = &state.settings;
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192))
        .keep_alive(true);
    let conn = builder
        .serve_connection(TokioIo::new(stream), svc)
        .with_upgrades();
    tokio::pin!(conn);
    let mut shutdown = state.shutdown_signal();
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = shutdown.changed() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(DRAIN, conn).await;
        }
    }
}

/// How long connections may take to finish in-flight requests at shutdown.
pub const DRAIN: Duration = Duration::from_secs(10);

/// Serves the HTTP inside an intercepted tunnel until it closes, `close` is notified (an
/// authentication failure inside the tunnel), or keyward shuts down.
pub async fn serve_intercepted<I, S>(state: &Arc<State>, io: TokioIo<I>, svc: S, close: Arc<Notify>)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    let settings = &state.settings;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(128)
        .max_header_list_size(settings.max_header_bytes.max(8192) as u32)
        .max_pending_accept_reset_streams(32)
        .keep_alive_interval(Some(Duration::from_secs(30)));
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let mut shutdown = state.shutdown_signal();
    tokio::select! {
        _ = conn.as_mut() => return,
        _ = close.notified() => {}
        _ = shutdown.changed() => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = tokio::time::timeout(DRAIN, conn).await;
}
