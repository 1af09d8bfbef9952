//! Upstream connections: one pool per service and host, dialling through a connector that
//! resolves, checks and dials the address itself.
//!
//! SECURITY: this is where I1 and the address rules of SPEC §4.5 hold. The connector dials the
//! exact address it checked (no second lookup to rebind), refuses loopback, private, link-local,
//! CGNAT and metadata addresses in every spelling unless the service names that address, and
//! verifies TLS for the request's host with no way to turn verification off. Pools are per
//! service and host: a connection that carried one service's credential never carries
//! another's, and a request for one host never goes out on a connection dialled, checked and
//! verified for another (a wildcard service's, or one with several hosts). An HTTP/1
//! connection carries one task's requests only: an upstream that sends more than a response's
//! framing says (a response-splitting bug an agent can feed, a short `Content-Length`) shifts
//! every later response on its connection by one, which must not hand one task another's.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, Uri};
use http_body::Body as _;
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::rt::{Read, ReadBufCursor, Write};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::policy::{CompiledPolicy, HostPattern, Scheme, ServiceDef};
use crate::tls;

/// Why an upstream connection could not be made. `kind()` is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("the upstream address is blocked")]
    Blocked,
    #[error("the upstream host could not be resolved")]
    Dns(#[source] io::Error),
    #[error("the upstream host refused or did not answer the connection")]
    Connect(#[source] io::Error),
    #[error("the upstream TLS handshake failed")]
    Tls(#[source] io::Error),
    #[error("connecting to the upstream timed out")]
    Timeout,
    #[error("the upstream connection could not start HTTP")]
    Handshake(#[source] hyper::Error),
    #[error("the upstream URI has no host")]
    NoHost,
}

impl ConnectError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConnectError::Blocked => "blocked",
            ConnectError::Dns(_) => "dns",
            ConnectError::Connect(_) | ConnectError::NoHost => "connect",
            ConnectError::Tls(_) => "tls",
            ConnectError::Handshake(_) => "protocol",
            ConnectError::Timeout => "timeout",
        }
    }
}

/// Body type sent upstream: the agent's, or none (a bodyless request sent again).
pub type UpBody = Either<crate::proxy::body::CountingBody<Incoming>, Empty<Bytes>>;

/// How long an HTTP/1 connection may sit idle in a pool before it is closed.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Most HTTP/1 connections a service keeps pooled (busy or idle) over all its hosts; more are
/// closed after use. Per service, not per host: else an agent calling many hosts of a wildcard
/// service could leave tens of thousands of sockets open.
const MAX_POOLED: usize = 256;
/// Connections a host may keep pooled even when its service has `MAX_POOLED` (so at most
/// `MAX_POOLED + MAX_POOLED_HOSTS * HOST_RESERVE` per service).
const HOST_RESERVE: usize = 4;
/// HTTP/2 flow-control windows toward upstreams (see `ServicePool::dial`).
const H2_STREAM_WINDOW: u32 = 1 << 20;
const H2_CONNECTION_WINDOW: u32 = 16 << 20;

/// Most hosts of one service whose connections are pooled (a wildcard service may see many);
/// a request for a further host gets a connection of its own, not kept.
const MAX_POOLED_HOSTS: usize = 256;
/// HTTP/2 connections kept per service and host (one per task); more tasks at once each dial
/// their own and the least recently used goes.
const MAX_POOLED_H2: usize = 256;

/// The connection pools of a policy generation: per service, per host.
pub struct Upstreams {
    services: Vec<ServiceUpstreams>,
}

struct ServiceUpstreams {
    connector: ConnectorInner,
    hosts: dashmap::DashMap<String, Arc<ServicePool>>,
}

impl Upstreams {
    pub fn build(
        policy: &CompiledPolicy,
        connect_timeout: Duration,
        own: &Arc<OwnListeners>,
    ) -> Result<Upstreams, tls::TlsError> {
        let mut services = Vec::new();
        for service in &policy.policy().services {
            let tls = match service.scheme {
                Scheme::Https => Some(tls::upstream::client_config(service.ca_file.as_deref())?),
                Scheme::Http => None,
            };
            // An upgrade (WebSocket) needs HTTP/1.1: its connection offers nothing else.
            let tls_http1 = tls.as_ref().map(|config| {
                let mut config = ClientConfig::clone(config);
                config.alpn_protocols = vec![b"http/1.1".to_vec()];
                TlsConnector::from(Arc::new(config))
            });
            services.push(ServiceUpstreams {
                connector: ConnectorInner {
                    tls: tls.map(TlsConnector::from),
                    tls_http1,
                    connect_to: service.connect_to.clone(),
                    named: named_addresses(service),
                    own: own.clone(),
                    timeout: connect_timeout,
                    pooled: Arc::default(),
                },
                hosts: dashmap::DashMap::new(),
            });
        }
        Ok(Upstreams { services })
    }

    /// The pool of `service`'s connections to `host` (as the target names it, lowercase).
    pub fn pool(&self, service: usize, host: &str) -> Option<Arc<ServicePool>> {
        let upstreams = self.services.get(service)?;
        if let Some(pool) = upstreams.hosts.get(host) {
            return Some(pool.clone());
        }
        let pool = Arc::new(ServicePool {
            connector: upstreams.connector.clone(),
            http1: Mutex::new(Vec::new()),
            http2: Mutex::new(Vec::new()),
            speaks_h2: AtomicBool::new(false),
            h2_dial: tokio::sync::Mutex::new(()),
            reaper: OnceLock::new(),
        });
        if upstreams.hosts.len() >= MAX_POOLED_HOSTS {
            // Hosts whose connections have all closed make room (else 256 made-up names
            // would leave every later host, real ones too, without pooling until a reload).
            upstreams.hosts.retain(|_, p| !p.is_empty());
            if upstreams.hosts.len() >= MAX_POOLED_HOSTS {
                return Some(pool);
            }
        }
        Some(
            upstreams
                .hosts
                .entry(host.to_owned())
                .or_insert(pool)
                .clone(),
        )
    }
}

/// Why a request got no response from the upstream.
#[derive(Debug)]
pub enum SendError {
    /// no connection could be made
    Connect(ConnectError),
    /// the connection broke or the upstream spoke broken HTTP
    Protocol(hyper::Error),
}

/// A service's upstream connections to one host, each reused by one task only. HTTP/1
/// connections carry one request at a time (a connection is taken only when it is ready for
/// its next request, so a streaming response never holds up another request); an HTTP/2
/// connection (chosen by ALPN) carries all of its task's requests at once. Nothing is shared between services or hosts, so a connection that
/// carried one service's credential never carries another's.
pub struct ServicePool {
    connector: ConnectorInner,
    /// HTTP/1 connections, busy or idle, most recently used last.
    http1: Mutex<Vec<Pooled>>,
    /// HTTP/2 connections, one per task (see `send`).
    http2: Mutex<Vec<PooledH2>>,
    /// Whether the host answered a dial with HTTP/2: then a task's first requests, sent at
    /// once, wait for one dial (`h2_dial`) instead of each dialling a connection of its own.
    speaks_h2: AtomicBool,
    h2_dial: tokio::sync::Mutex<()>,
    /// Closes connections idle too long once traffic stops (started on first use).
    reaper: OnceLock<()>,
}

impl Drop for ServicePool {
    /// A host's pool evicted from its service's map takes its connections with it.
    fn drop(&mut self) {
        let held = self.http1.get_mut().map_or(0, |c| c.len());
        self.connector.pooled.fetch_sub(held, Ordering::Relaxed);
    }
}

/// A task's HTTP/2 connection to the host.
struct PooledH2 {
    sender: http2::SendRequest<UpBody>,
    /// when it last carried a request
    used: Instant,
    task: u64,
}

struct Pooled {
    sender: http1::SendRequest<UpBody>,
    /// when it last carried a request
    used: Instant,
    /// The task whose requests it carries (`Task::serial`).
    task: u64,
}

impl Pooled {
    fn expired(&self, now: Instant) -> bool {
        self.sender.is_closed()
            || (self.sender.is_ready() && now.duration_since(self.used) > IDLE_TIMEOUT)
    }
}

enum Sender {
    Http1(http1::SendRequest<UpBody>),
    Http2(http2::SendRequest<UpBody>),
}

impl ServicePool {
    /// Sends `req` (absolute-form URI, no `Host`) for the task with serial `task` on a pooled
    /// connection or a new one and returns the response head; the body streams afterwards.
    /// Connections are reused by their own task only, HTTP/2 ones too (each carries all of
    /// its task's requests at once).
    ///
    /// SECURITY (fairness): on a connection shared by every task, one task's agent could stall
    /// the others: responses it leaves unread hold the connection's flow-control window, its
    /// streams the upstream's concurrent-stream limit, and its cancelled streams (each a
    /// `RST_STREAM` after the credential went out) can get the connection closed by an
    /// upstream that guards against rapid resets. Per task, that only ever hurts itself.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<UpBody>,
        task: u64,
    ) -> Result<Response<Incoming>, SendError> {
        if req.headers().contains_key(http::header::UPGRADE) {
            // A WebSocket upgrade takes over its connection: a fresh HTTP/1.1 one, even when
            // the upstream speaks HTTP/2 to everything else.
            return self.send_new(req, true, task).await;
        }
        if let Some(h2) = self.live_http2(task) {
            return self.send_http2(h2, req, task).await;
        }
        if self.speaks_h2.load(Ordering::Relaxed) {
            let dialled = {
                let _one_dial = self.h2_dial.lock().await;
                match self.live_http2(task) {
                    Some(h2) => Sender::Http2(h2),
                    None => {
                        let dialled = Box::pin(self.dial(req.uri(), false))
                            .await
                            .map_err(SendError::Connect)?;
                        // Kept before the next waiter looks.
                        match &dialled {
                            Sender::Http2(h2) => self.put_http2(h2.clone(), task),
                            // The host no longer offers HTTP/2: its HTTP/1 connections are
                            // pooled and dialled in parallel again.
                            Sender::Http1(_) => self.speaks_h2.store(false, Ordering::Relaxed),
                        }
                        dialled
                    }
                }
            };
            return self.send_on(dialled, req, task).await;
        }
        if let Some(sender) = self.checkout_http1(task) {
            let again = replayable(&req);
            match self.send_http1(sender, req, task).await {
                // The connection closed before the request was written (the upstream timed it
                // out as we took it): nothing was sent, so a new connection may carry it.
                Err(Retry::Unsent(req)) => return self.send_new(req, false, task).await,
                // The upstream closed the reused connection as the request went out, before
                // any answer (the keep-alive race): a bodyless GET, HEAD or OPTIONS is sent
                // once more on a new connection (RFC 9110 §9.2.2); anything else is not.
                Err(Retry::Failed(e)) => {
                    return match again {
                        Some(req) if closed_before_answer(&e) => {
                            self.send_new(req, false, task).await
                        }
                        _ => Err(SendError::Protocol(e)),
                    }
                }
                Ok(resp) => return Ok(resp),
            }
        }
        self.send_new(req, false, task).await
    }

    /// Sends on a new connection; `http1_only` offers only HTTP/1.1 by ALPN.
    async fn send_new(
        self: &Arc<Self>,
        req: Request<UpBody>,
        http1_only: bool,
        task: u64,
    ) -> Result<Response<Incoming>, SendError> {
        // Boxed: dialling (TCP, TLS, the HTTP/2 handshake) is a 6.5 KB future, which would
        // otherwise make every request's future that large, copied as it is awaited; a new
        // connection is rare next to the requests that reuse one.
        let dialled = Box::pin(self.dial(req.uri(), http1_only))
            .await
            .map_err(SendError::Connect)?;
        self.send_on(dialled, req, task).await
    }

    /// Sends on an HTTP/2 connection. `Connection` is HTTP/1's (keyward names `te` there, RFC
    /// 9110 §10.1.4), and hyper drops every header it names before HTTP/2: `te: trailers` with
    /// it, which gRPC servers require. So it goes first.
    async fn send_http2(
        self: &Arc<Self>,
        mut h2: http2::SendRequest<UpBody>,
        mut req: Request<UpBody>,
        task: u64,
    ) -> Result<Response<Incoming>, SendError> {
        req.headers_mut().remove(http::header::CONNECTION);
        h2.send_request(req)
            .await
            .map_err(|e| self.http2_failed(e, task))
    }

    /// Sends on a connection just dialled (or found by a request that waited for a dial),
    /// keeping an HTTP/2 one for the task.
    async fn send_on(
        self: &Arc<Self>,
        sender: Sender,
        req: Request<UpBody>,
        task: u64,
    ) -> Result<Response<Incoming>, SendError> {
        match sender {
            Sender::Http2(h2) => {
                self.speaks_h2.store(true, Ordering::Relaxed);
                self.put_http2(h2.clone(), task);
                self.send_http2(h2, req, task).await
            }
            Sender::Http1(sender) => match self.send_http1(sender, req, task).await {
                Ok(resp) => Ok(resp),
                Err(Retry::Unsent(_)) => Err(SendError::Connect(closed_early())),
                Err(Retry::Failed(e)) => Err(SendError::Protocol(e)),
            },
        }
    }

    /// HTTP/1 wants origin form and a `Host`; the pool gets the connection back as soon as the
    /// response head is in (it is taken again only once ready).
    ///
    /// SECURITY: a connection that carried a request body is closed after its response, and
    /// the request says so (`Connection: close`). An upstream that does not read a body as
    /// the body — it answers before it (an early `401`, a `417`) or ignores `Content-Length`
    /// on a route that takes none (the 0.CL and CL.0 desyncs) — reads the agent's bytes as the
    /// connection's next request: one keyward never decided, whose own body would swallow the
    /// head of the task's next request on that connection, credential included. A bodyless
    /// request's framing is keyward's own, so its connection is reused.
    async fn send_http1(
        self: &Arc<Self>,
        mut sender: http1::SendRequest<UpBody>,
        mut req: Request<UpBody>,
        task: u64,
    ) -> Result<Response<Incoming>, Retry> {
        to_origin_form(&mut req);
        join_cookies(req.headers_mut());
        let carries_body = !req.body().is_end_stream();
        if carries_body {
            let headers = req.headers_mut();
            // (`te` stays named beside it: RFC 9110 §10.1.4.)
            let connection = match headers.contains_key(http::header::TE) {
                true => "close, te",
                false => "close",
            };
            headers.insert(
                http::header::CONNECTION,
                HeaderValue::from_static(connection),
            );
            // hyper sends a GET's (or HEAD's) body of unknown length as no body at all
            // unless told how to frame it: a search API's query would vanish.
            if !headers.contains_key(http::header::CONTENT_LENGTH) {
                headers.insert(
                    http::header::TRANSFER_ENCODING,
                    HeaderValue::from_static("chunked"),
                );
            }
        }
        match sender.try_send_request(req).await {
            Ok(resp) => {
                if !carries_body && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS {
                    self.put_back(sender, task);
                }
                Ok(resp)
            }
            Err(mut e) => match e.take_message() {
                Some(mut req) => {
                    from_origin_form(&mut req);
                    Err(Retry::Unsent(req))
                }
                None => Err(Retry::Failed(e.into_error())),
            },
        }
    }

    /// A stream the task's HTTP/2 connection refused (`REFUSED_STREAM`, `ENHANCE_YOUR_CALM`)
    /// retires that connection: the task's next request dials a new one. An upstream that
    /// stopped taking streams on it (say, after its agent left many downloads unread) would
    /// otherwise fail the task's requests for as long as it keeps the connection open.
    fn http2_failed(&self, e: hyper::Error, task: u64) -> SendError {
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            if let Some(h2e) = s.downcast_ref::<h2::Error>() {
                let refused = matches!(
                    h2e.reason(),
                    Some(h2::Reason::REFUSED_STREAM | h2::Reason::ENHANCE_YOUR_CALM)
                );
                if refused {
                    if let Ok(mut conns) = self.http2.lock() {
                        conns.retain(|c| c.task != task);
                    }
                }
                break;
            }
            source = s.source();
        }
        SendError::Protocol(e)
    }

    /// The task's HTTP/2 connection, if it has one still open.
    fn live_http2(&self, task: u64) -> Option<http2::SendRequest<UpBody>> {
        let mut conns = self.http2.lock().ok()?;
        let at = conns.iter().position(|c| c.task == task)?;
        let conn = conns.get_mut(at)?;
        if conn.sender.is_closed() {
            conns.swap_remove(at);
            return None;
        }
        conn.used = Instant::now();
        Some(conn.sender.clone())
    }

    /// Keeps a new HTTP/2 connection for its task. At `MAX_POOLED_H2` the one unused longest
    /// goes (its streams still finish: hyper closes it once they have).
    fn put_http2(self: &Arc<Self>, sender: http2::SendRequest<UpBody>, task: u64) {
        self.start_reaper();
        let Ok(mut conns) = self.http2.lock() else {
            return;
        };
        conns.retain(|c| c.task != task && !c.sender.is_closed());
        if conns.len() >= MAX_POOLED_H2 {
            if let Some(oldest) = conns.iter().enumerate().min_by_key(|(_, c)| c.used) {
                let i = oldest.0;
                conns.swap_remove(i);
            }
        }
        conns.push(PooledH2 {
            sender,
            used: Instant::now(),
            task,
        });
    }

    /// The task's most recently used HTTP/1 connection that is ready for a request; drops
    /// closed and long-idle ones on the way.
    fn checkout_http1(&self, task: u64) -> Option<http1::SendRequest<UpBody>> {
        let mut conns = self.http1.lock().ok()?;
        self.drop_expired(&mut conns);
        let ready = conns
            .iter()
            .rposition(|c| c.task == task && c.sender.is_ready())?;
        self.connector.pooled.fetch_sub(1, Ordering::Relaxed);
        Some(conns.swap_remove(ready).sender)
    }

    fn prune(&self) {
        if let Ok(mut conns) = self.http1.lock() {
            self.drop_expired(&mut conns);
        }
        // An HTTP/2 connection no request used for `IDLE_TIMEOUT` is let go: hyper closes it
        // once its last stream (a long download, say) has ended.
        if let Ok(mut conns) = self.http2.lock() {
            let now = Instant::now();
            conns.retain(|c| !c.sender.is_closed() && now.duration_since(c.used) <= IDLE_TIMEOUT);
        }
    }

    fn drop_expired(&self, conns: &mut Vec<Pooled>) {
        let now = Instant::now();
        let before = conns.len();
        conns.retain(|c| !c.expired(now));
        self.connector
            .pooled
            .fetch_sub(before - conns.len(), Ordering::Relaxed);
    }

    fn put_back(self: &Arc<Self>, sender: http1::SendRequest<UpBody>, task: u64) {
        self.start_reaper();
        let Ok(mut conns) = self.http1.lock() else {
            return;
        };
        let pooled = &self.connector.pooled;
        let service_full = pooled.fetch_add(1, Ordering::Relaxed) >= MAX_POOLED;
        // A host keeps a few even when the service is full, so one host's burst (or an agent
        // parking slow requests on made-up hosts) cannot end reuse for all the others.
        if (service_full && conns.len() >= HOST_RESERVE) || conns.len() >= MAX_POOLED {
            // Full: the connection idle longest makes room (it may be an ended task's, which
            // nothing would take again), else this one is closed after its response.
            let idle = conns
                .iter()
                .enumerate()
                .filter(|(_, c)| c.sender.is_ready())
                .min_by_key(|(_, c)| c.used)
                .map(|(i, _)| i);
            match idle {
                Some(i) => {
                    conns.swap_remove(i);
                }
                None => {
                    pooled.fetch_sub(1, Ordering::Relaxed);
                    return;
                }
            }
            pooled.fetch_sub(1, Ordering::Relaxed);
        }
        conns.push(Pooled {
            sender,
            used: Instant::now(),
            task,
        });
    }

    /// No pooled connection (an HTTP/2 one that closed does not count).
    fn is_empty(&self) -> bool {
        let no_http1 = self.http1.lock().map_or(true, |c| c.is_empty());
        let no_http2 = self
            .http2
            .lock()
            .map_or(true, |h| h.iter().all(|c| c.sender.is_closed()));
        no_http1 && no_http2
    }

    /// Once traffic stops nothing checks connections out, so a timer closes the idle ones.
    /// It holds the pool weakly and ends with it (a policy reload drops the old pools).
    fn start_reaper(self: &Arc<Self>) {
        if self.reaper.set(()).is_err() {
            return; // already running
        }
        let pool = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(IDLE_TIMEOUT / 3);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(pool) = pool.upgrade() else { return };
                pool.prune();
            }
        });
    }

    /// A new connection; `http1_only` offers only HTTP/1.1 by ALPN.
    async fn dial(&self, uri: &Uri, http1_only: bool) -> Result<Sender, ConnectError> {
        let connecting = connect(&self.connector, uri, http1_only);
        let stream = tokio::time::timeout(self.connector.timeout, connecting)
            .await
            .map_err(|_| ConnectError::Timeout)??;
        if stream.is_h2() {
            // Every request of the task shares this connection, so an agent that stops reading
            // one download must not stall its others at once: a stream may hold 1 MiB unread,
            // the connection 16 (hyper's 2 and 5 let 3 stalled streams do it).
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .initial_stream_window_size(H2_STREAM_WINDOW)
                .initial_connection_window_size(H2_CONNECTION_WINDOW)
                .handshake(stream)
                .await
                .map_err(ConnectError::Handshake)?;
            tokio::spawn(conn);
            Ok(Sender::Http2(sender))
        } else {
            let (sender, conn) = http1::Builder::new()
                .handshake(AnswerOverReset::new(stream))
                .await
                .map_err(ConnectError::Handshake)?;
            // With upgrades: a WebSocket's `101` hands the connection over to the relay.
            tokio::spawn(conn.with_upgrades());
            Ok(Sender::Http1(sender))
        }
    }
}

/// A copy of a request that may be sent again if a reused connection drops it unanswered:
/// safe methods only, and only without a body (a body is streamed, not kept).
fn replayable(req: &Request<UpBody>) -> Option<Request<UpBody>> {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe || !req.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(Either::Right(Empty::new()));
    *copy.method_mut() = req.method().clone();
    *copy.uri_mut() = req.uri().clone();
    *copy.version_mut() = req.version();
    *copy.headers_mut() = req.headers().clone();
    Some(copy)
}

/// The connection ended without a byte of an answer: closed or reset under the request.
fn closed_before_answer(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() || e.is_canceled() {
        return true;
    }
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<io::Error>())
        .is_some_and(|io| {
            matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
            )
        })
}

// Short-lived, returned once per failed send: boxing the request would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Retry {
    Unsent(Request<UpBody>),
    Failed(hyper::Error),
}

/// An HTTP/2 agent may split `Cookie` into one field per cookie; HTTP/1 wants them joined
/// with `; ` into one (RFC 9113 §8.2.3), as an origin reads a single `Cookie` line.
fn join_cookies(headers: &mut http::HeaderMap) {
    let cookies = headers.get_all(http::header::COOKIE);
    if cookies.iter().nth(1).is_none() {
        return;
    }
    let joined = cookies
        .iter()
        .map(HeaderValue::as_bytes)
        .collect::<Vec<_>>()
        .join(&b"; "[..]);
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(http::header::COOKIE, value);
    }
}

/// `https://host:port/p?q` → `/p?q` with `Host: host:port` (the port only when not the
/// scheme's default, as `aim` wrote the authority).
fn to_origin_form(req: &mut Request<UpBody>) {
    let uri = std::mem::take(req.uri_mut());
    if let Some(authority) = uri.authority() {
        if let Ok(host) = http::HeaderValue::from_str(authority.as_str()) {
            req.headers_mut().insert(http::header::HOST, host);
        }
    }
    let mut parts = uri.into_parts();
    // Kept aside so an unsent request can be turned back for another connection.
    req.extensions_mut().insert(Absolute {
        scheme: parts.scheme.take(),
        authority: parts.authority.take(),
    });
    *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
}

fn from_origin_form(req: &mut Request<UpBody>) {
    if let Some(abs) = req.extensions_mut().remove::<Absolute>() {
        let mut parts = std::mem::take(req.uri_mut()).into_parts();
        parts.scheme = abs.scheme;
        parts.authority = abs.authority;
        *req.uri_mut() = Uri::from_parts(parts).unwrap_or_default();
        req.headers_mut().remove(http::header::HOST);
    }
}

#[derive(Clone)]
struct Absolute {
    scheme: Option<http::uri::Scheme>,
    authority: Option<http::uri::Authority>,
}

/// Addresses the operator wrote down for a service: IP-literal hosts. Those may be private.
fn named_addresses(service: &ServiceDef) -> Vec<IpAddr> {
    service
        .hosts
        .iter()
        .filter_map(|h| match h {
            HostPattern::Exact(name) => name.parse().ok(),
            HostPattern::Wildcard(_) => None,
        })
        .collect()
}

#[derive(Clone)]
struct ConnectorInner {
    tls: Option<TlsConnector>,
    /// The same TLS settings offering only HTTP/1.1 by ALPN.
    tls_http1: Option<TlsConnector>,
    /// `connect_to`: dial this instead of resolving the host (the operator chose it).
    connect_to: Option<(String, u16)>,
    named: Vec<IpAddr>,
    own: Arc<OwnListeners>,
    timeout: Duration,
    /// HTTP/1 connections pooled over all of the service's hosts (shared by their pools).
    pooled: Arc<std::sync::atomic::AtomicUsize>,
}

/// A fresh connection closed before the request could be written.
fn closed_early() -> ConnectError {
    ConnectError::Connect(io::Error::new(
        io::ErrorKind::ConnectionReset,
        "closed before the request",
    ))
}

async fn connect(
    inner: &ConnectorInner,
    uri: &Uri,
    http1_only: bool,
) -> Result<UpstreamStream, ConnectError> {
    let host = uri.host().ok_or(ConnectError::NoHost)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let https = uri.scheme_str() == Some("https");
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addrs = match &inner.connect_to {
        // The operator chose this address, so it may be private; never keyward itself.
        Some((h, p)) => check_addresses(resolve(h, *p).await?, None, &inner.own)?,
        None => check_addresses(resolve(host, port).await?, Some(&inner.named), &inner.own)?,
    };
    let tcp = dial(&addrs).await?;
    let _ = tcp.set_nodelay(true);
    let tls = if http1_only {
        &inner.tls_http1
    } else {
        &inner.tls
    };
    match (tls, https) {
        (Some(tls), true) => {
            let name = ServerName::try_from(host.to_string())
                .map_err(|e| ConnectError::Tls(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
            let stream = tls.connect(name, tcp).await.map_err(ConnectError::Tls)?;
            let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
            Ok(UpstreamStream::Tls(TokioIo::new(stream), h2))
        }
        (None, false) => Ok(UpstreamStream::Plain(TokioIo::new(tcp))),
        // SECURITY: a scheme that disagrees with the service never dials in the clear.
        _ => Err(ConnectError::Tls(io::Error::new(
            io::ErrorKind::InvalidInput,
            "scheme does not match the service",
        ))),
    }
}

/// keyward's own listening addresses, known once bound. A request or tunnel aimed at them would
/// reach the admin API or loop through the proxy with keyward's own authority.
#[derive(Default)]
pub struct OwnListeners {
    proxy: OnceLock<SocketAddr>,
    admin: OnceLock<SocketAddr>,
}

impl OwnListeners {
    /// Records the bound addresses (once; later calls are ignored).
    pub fn set(&self, proxy: SocketAddr, admin: SocketAddr) {
        let _ = self.proxy.set(proxy);
        let _ = self.admin.set(admin);
    }

    pub fn proxy(&self) -> Option<SocketAddr> {
        self.proxy.get().copied()
    }

    pub fn admin(&self) -> Option<SocketAddr> {
        self.admin.get().copied()
    }

    /// Whether dialling `addr` could reach one of keyward's own listeners. A listener bound to
    /// an unspecified address answers on every local address: there any loopback, private or
    /// link-local address (a pod's own IP among them) on that port counts as keyward's own,
    /// and so does any other address of this host (a public one), which the OS confirms.
    ///
    /// SECURITY: the address is compared as the kernel will dial it: `::ffff:127.0.0.1` is
    /// `127.0.0.1`, and an unspecified address (`0.0.0.0`, `::`) is dialled as this host, so it
    /// counts as every local listener on that port.
    pub fn contains(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        [self.proxy.get(), self.admin.get()]
            .into_iter()
            .flatten()
            .any(|own| {
                let own_ip = own.ip().to_canonical();
                own.port() == addr.port()
                    && (own_ip == ip
                        || ip.is_unspecified()
                        || (own_ip.is_unspecified() && (is_blocked(ip) || is_local(ip))))
            })
    }
}

/// Whether `ip` is an address of this host: only a local address can be bound.
fn is_local(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// SECURITY: every answer must be allowed, so a mixed answer (a rebinding attempt) is refused
/// whole. Addresses outside `named` that are loopback, private or metadata are refused; with
/// `named` = `None` (the operator chose the address) only keyward's own listeners are.
pub fn check_addresses(
    addrs: Vec<SocketAddr>,
    named: Option<&[IpAddr]>,
    own: &OwnListeners,
) -> Result<Vec<SocketAddr>, ConnectError> {
    let refused = |a: &SocketAddr| {
        own.contains(*a) || named.is_some_and(|n| is_blocked(a.ip()) && !n.contains(&a.ip()))
    };
    if addrs.iter().any(refused) {
        return Err(ConnectError::Blocked);
    }
    Ok(addrs)
}

/// Resolves `host:port` once; IP literals are not looked up.
pub async fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, ConnectError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![SocketAddr::new(ip, port)]);
    }
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port))
        .await
        .map_err(ConnectError::Dns)?
        .collect();
    if addrs.is_empty() {
        return Err(ConnectError::Dns(io::Error::new(
            io::ErrorKind::NotFound,
            "no addresses",
        )));
    }
    Ok(addrs)
}

/// Dials the checked addresses in order.
pub async fn dial(addrs: &[SocketAddr]) -> Result<TcpStream, ConnectError> {
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(ConnectError::Connect(last.unwrap_or_else(|| {
        io::Error::new(io::ErrorKind::NotFound, "no addresses")
    })))
}

/// Loopback, private, link-local, CGNAT, metadata, multicast, reserved and unspecified
/// addresses, in every IPv6 spelling that embeds an IPv4 address.
pub fn is_blocked(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_blocked_v4(v4),
        IpAddr::V6(v6) => is_blocked_v6(v6),
    }
}

fn is_blocked_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16: cloud metadata
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b)) // CGNAT 100.64/10
        || (a == 192 && b == 0 && ip.octets()[2] == 0) // IETF protocol assignments
        || (a == 198 && (b == 18 || b == 19)) // benchmarking
        || a >= 240 // reserved
}

fn is_blocked_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_blocked_v4(v4);
    }
    let seg = ip.segments();
    // IPv4-compatible (::a.b.c.d), IPv4-translated (::ffff:0:a.b.c.d), NAT64 (64:ff9b::/96
    // and the local-use 64:ff9b:1::/48) and 6to4 (2002::/16) embed an IPv4 address.
    if seg[..6] == [0, 0, 0, 0, 0, 0] && !(seg[6] == 0 && seg[7] <= 1) {
        return is_blocked_v4(embedded_v4(seg[6], seg[7]));
    }
    if seg[..6] == [0, 0, 0, 0, 0xffff, 0]
        || seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0]
        || seg[..3] == [0x64, 0xff9b, 1]
    {
        return is_blocked_v4(embedded_v4(seg[6], seg[7]));
    }
    if seg[0] == 0x2002 {
        return is_blocked_v4(embedded_v4(seg[1], seg[2]));
    }
    ip.is_loopback()
        || ip.is_unspecified()
        || ip.is_multicast()
        || (seg[0] & 0xfe00) == 0xfc00 // unique local fc00::/7 (fd00:ec2::254 metadata)
        || (seg[0] & 0xffc0) == 0xfe80 // link-local
        || (seg[0] & 0xffc0) == 0xfec0 // site-local (deprecated)
        || (seg[0] == 0x2001 && seg[1] == 0x0db8) // documentation
        // Teredo 2001::/32: a tunnel to an IPv4 host whose address is stored inverted (no API
        // serves from one).
        || (seg[0] == 0x2001 && seg[1] == 0)
}

fn embedded_v4(hi: u16, lo: u16) -> Ipv4Addr {
    Ipv4Addr::new((hi >> 8) as u8, hi as u8, (lo >> 8) as u8, lo as u8)
}

/// A dialled upstream connection, plain or TLS (with whether ALPN chose h2).
// TLS is the common case; boxing it would cost an allocation per connection for nothing.
#[allow(clippy::large_enum_variant)]
pub enum UpstreamStream {
    Plain(TokioIo<TcpStream>),
    Tls(TokioIo<TlsStream<TcpStream>>, bool),
}

impl UpstreamStream {
    fn is_h2(&self) -> bool {
        matches!(self, UpstreamStream::Tls(_, true))
    }
}

impl Read for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s, _) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl Write for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s, _) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s, _) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s, _) => Pin::new(s).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s, _) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s, _) => s.is_write_vectored(),
        }
    }
}

/// An HTTP/1 upstream connection on which a write that finds the peer gone (reset, broken
/// pipe), and every write for `ANSWER_GRACE` after it, count as sent. An upstream that answers
/// a large upload early (413, 401) and closes without reading the rest resets the connection;
/// its answer is already in the receive buffer, but hyper fails the exchange on the first
/// failed write, so the agent would get a 502 (or nothing) instead of the upstream's answer
/// depending on which came first. With the writes taken as sent, hyper reads on: the answer is
/// relayed, and an upstream that reset without one still ends the exchange with an error on
/// the read side (which a reset connection always gives), so nothing waits. After the grace
/// the error comes through: a WebSocket relay (whose upstream is this connection) is not
/// left writing into nothing.
struct AnswerOverReset<T> {
    io: T,
    gone: Option<Instant>,
}

/// How long writes to a connection found reset still count as sent: time for hyper to read
/// an answer that was already there.
const ANSWER_GRACE: Duration = Duration::from_secs(5);

impl<T> AnswerOverReset<T> {
    fn new(io: T) -> Self {
        AnswerOverReset { io, gone: None }
    }

    /// `Some` with what a write now returns, once the peer is gone.
    fn after_reset(&self, written: usize) -> Option<io::Result<usize>> {
        let since = self.gone?;
        Some(match since.elapsed() < ANSWER_GRACE {
            true => Ok(written),
            false => Err(io::ErrorKind::BrokenPipe.into()),
        })
    }

    /// `written` as sent when the peer is gone.
    fn settle(&mut self, r: Poll<io::Result<usize>>, written: usize) -> Poll<io::Result<usize>> {
        match r {
            Poll::Ready(Err(e)) if peer_gone(&e) => {
                self.gone = Some(Instant::now());
                Poll::Ready(Ok(written))
            }
            other => other,
        }
    }
}

fn peer_gone(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

impl<T: Read + Unpin> Read for AnswerOverReset<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: ReadBufCursor<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl<T: Write + Unpin> Write for AnswerOverReset<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if let Some(r) = this.after_reset(buf.len()) {
            return Poll::Ready(r);
        }
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        this.settle(r, buf.len())
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let all = bufs.iter().map(|b| b.len()).sum();
        if let Some(r) = this.after_reset(all) {
            return Poll::Ready(r);
        }
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.settle(r, all)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(r) = this.after_reset(0) {
            return Poll::Ready(r.map(|_| ()));
        }
        let r = Pin::new(&mut this.io).poll_flush(cx).map_ok(|()| 0);
        this.settle(r, 0).map_ok(|_| ())
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(r) = this.after_reset(0) {
            return Poll::Ready(r.map(|_| ()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {

    /// A connection whose every write and flush fails with one error.
    struct Failing(io::ErrorKind);

    impl Write for Failing {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &[u8],
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Err(self.0.into()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Err(self.0.into()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn writes_to_a_reset_connection_count_as_sent_for_a_grace_only() {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        let mut write = |io: &mut AnswerOverReset<Failing>, buf: &[u8]| match Pin::new(io)
            .poll_write(&mut cx, buf)
        {
            Poll::Ready(r) => r.map_err(|e| e.kind()),
            Poll::Pending => panic!("pending"),
        };
        let mut io = AnswerOverReset::new(Failing(io::ErrorKind::ConnectionReset));
        assert_eq!(write(&mut io, b"hello"), Ok(5));
        assert_eq!(write(&mut io, b"abc"), Ok(3), "still within the grace");
        // The grace is over: the reset comes through (a relay is not left writing on).
        io.gone = io.gone.map(|t| t - ANSWER_GRACE);
        assert_eq!(write(&mut io, b"abc"), Err(io::ErrorKind::BrokenPipe));
        // Other errors were never hidden.
        let mut io = AnswerOverReset::new(Failing(io::ErrorKind::PermissionDenied));
        assert_eq!(write(&mut io, b"x"), Err(io::ErrorKind::PermissionDenied));
    }

    /// HTTP/1 connections handshaken over in-memory pipes (the far ends are returned, to keep
    /// the connections open).
    async fn senders(n: usize) -> Vec<(http1::SendRequest<UpBody>, tokio::io::DuplexStream)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let (near, far) = tokio::io::duplex(1024);
            let (sender, conn) = http1::handshake(TokioIo::new(near)).await.unwrap();
            tokio::spawn(conn);
            out.push((sender, far));
        }
        out
    }

    /// One plain service's pools, no policy needed.
    fn one_service() -> Upstreams {
        Upstreams {
            services: vec![ServiceUpstreams {
                connector: ConnectorInner {
                    tls: None,
                    tls_http1: None,
                    connect_to: None,
                    named: Vec::new(),
                    own: Arc::default(),
                    timeout: Duration::from_secs(1),
                    pooled: Arc::default(),
                },
                hosts: dashmap::DashMap::new(),
            }],
        }
    }

    #[tokio::test]
    async fn a_service_pools_at_most_max_pooled_connections_over_all_its_hosts() {
        let upstreams = one_service();
        let pooled = Arc::clone(&upstreams.services[0].connector.pooled);
        let mut far_ends = Vec::new();
        for host in ["a.test", "b.test", "c.test"] {
            let pool = upstreams.pool(0, host).unwrap();
            for (sender, far) in senders(100).await {
                pool.put_back(sender, 1);
                far_ends.push(far);
            }
        }
        let held = |u: &Upstreams| -> usize {
            u.services[0]
                .hosts
                .iter()
                .map(|p| p.http1.lock().unwrap().len())
                .sum()
        };
        assert_eq!(held(&upstreams), MAX_POOLED);
        assert_eq!(pooled.load(Ordering::Relaxed), MAX_POOLED);

        // Taking one out makes room for one more, on any host; and a host the full service
        // had no room for still keeps its reserve (one host's burst cannot end reuse for all).
        tokio::time::sleep(Duration::from_millis(20)).await; // the connections become ready
        let a = upstreams.pool(0, "a.test").unwrap();
        assert!(a.checkout_http1(1).is_some());
        assert_eq!(pooled.load(Ordering::Relaxed), MAX_POOLED - 1);
        let d = upstreams.pool(0, "d.test").unwrap();
        for (sender, far) in senders(HOST_RESERVE + 2).await {
            d.put_back(sender, 1);
            far_ends.push(far);
        }
        assert_eq!(d.http1.lock().unwrap().len(), HOST_RESERVE);
        assert_eq!(held(&upstreams), MAX_POOLED - 1 + HOST_RESERVE);
        assert_eq!(pooled.load(Ordering::Relaxed), held(&upstreams));

        // Closed connections leave the count when pruned, and an evicted host's pool takes
        // its connections off it.
        drop(far_ends);
        tokio::time::sleep(Duration::from_millis(50)).await;
        for p in upstreams.services[0].hosts.iter() {
            p.prune();
        }
        assert_eq!(pooled.load(Ordering::Relaxed), 0);
        assert!(upstreams.services[0].hosts.iter().all(|p| p.is_empty()));
    }

    #[tokio::test]
    async fn an_http1_connection_is_reused_by_its_own_task_only() {
        let upstreams = one_service();
        let pool = upstreams.pool(0, "a.test").unwrap();
        let mut far_ends = Vec::new();
        for (task, (sender, far)) in [7, 8].into_iter().zip(senders(2).await) {
            pool.put_back(sender, task);
            far_ends.push(far);
        }
        tokio::time::sleep(Duration::from_millis(20)).await; // the connections become ready
        assert!(
            pool.checkout_http1(9).is_none(),
            "another task's connection was reused"
        );
        assert!(pool.checkout_http1(7).is_some());
        assert!(
            pool.checkout_http1(7).is_none(),
            "task 8's connection went to task 7"
        );
        assert!(pool.checkout_http1(8).is_some());
    }

    use super::*;

    #[test]
    fn only_bodyless_safe_requests_are_sent_again() {
        let req = |method: Method| {
            let mut r: Request<UpBody> = Request::new(Either::Right(Empty::new()));
            *r.method_mut() = method;
            *r.uri_mut() = Uri::from_static("http://api.test/x");
            r.headers_mut()
                .insert("authorization", http::HeaderValue::from_static("Bearer k"));
            r
        };
        for m in [Method::GET, Method::HEAD, Method::OPTIONS] {
            let copy = replayable(&req(m.clone())).expect("a safe bodyless request");
            assert_eq!(copy.method(), m);
            assert_eq!(copy.uri(), "http://api.test/x");
            assert_eq!(copy.headers()["authorization"], "Bearer k");
        }
        for m in [Method::POST, Method::PUT, Method::DELETE, Method::PATCH] {
            assert!(replayable(&req(m)).is_none());
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn own_listeners_are_never_a_destination() {
        let own = OwnListeners::default();
        own.set(addr("127.0.0.1:3128"), addr("0.0.0.0:9090"));
        assert!(own.contains(addr("127.0.0.1:3128")));
        // The admin listener answers on every local address.
        for a in [
            "127.0.0.1:9090",
            "127.0.0.2:9090",
            "10.0.0.7:9090",
            "[::1]:9090",
        ] {
            assert!(own.contains(addr(a)), "{a} may be keyward's admin listener");
        }
        for a in ["127.0.0.1:3129", "127.0.0.2:3128", "93.184.216.34:9090"] {
            assert!(!own.contains(addr(a)), "{a} is not keyward");
        }
        // So does this host's address on its default route, public or not (a UDP `connect`
        // only picks the route; nothing is sent). A machine without a route has none.
        let routed = std::net::UdpSocket::bind("0.0.0.0:0")
            .and_then(|s| s.connect("203.0.113.1:9").map(|()| s))
            .and_then(|s| s.local_addr());
        if let Ok(local) = routed {
            let a = SocketAddr::new(local.ip(), 9090);
            assert!(
                own.contains(a),
                "{a} is this host: keyward's admin listener"
            );
        }
        // Spellings the kernel dials as the proxy listener's address.
        for a in ["0.0.0.0:3128", "[::]:3128", "[::ffff:127.0.0.1]:3128"] {
            assert!(
                own.contains(addr(a)),
                "{a} reaches keyward's proxy listener"
            );
        }
        // Even an address the operator chose (connect_to) or named is refused when it is ours.
        assert!(check_addresses(vec![addr("127.0.0.1:3128")], None, &own).is_err());
        let named = ["127.0.0.1".parse().unwrap()];
        assert!(check_addresses(vec![addr("127.0.0.1:3128")], Some(&named), &own).is_err());
        assert!(check_addresses(vec![addr("127.0.0.1:8080")], Some(&named), &own).is_ok());
        assert!(check_addresses(vec![addr("127.0.0.1:8080")], None, &own).is_ok());
    }

    #[test]
    fn one_blocked_answer_refuses_the_whole_resolution() {
        let own = OwnListeners::default();
        let answers = vec![addr("93.184.216.34:443"), addr("169.254.169.254:443")];
        assert!(check_addresses(answers, Some(&[]), &own).is_err());
        assert!(check_addresses(vec![addr("93.184.216.34:443")], Some(&[]), &own).is_ok());
    }

    #[test]
    fn blocks_every_spelling_of_internal_addresses() {
        for a in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::7f00:1",
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "2002:7f00:1::",
            "fd00:ec2::254",
            "fe80::1",
            // Teredo, whose client address (inverted) is 127.0.0.1.
            "2001:0:4136:e378:8000:63bf:80ff:fffe",
        ] {
            assert!(is_blocked(a.parse().unwrap()), "{a} must be blocked");
        }
        for a in [
            "93.184.216.34",
            "2606:4700::1111",
            "1.1.1.1",
            "100.128.0.1",
            "::ffff:0:5db8:d822",
        ] {
            assert!(!is_blocked(a.parse().unwrap()), "{a} must be allowed");
        }
    }
}
