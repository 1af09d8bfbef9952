//! One agent connection: the HTTP/1.1 proxy listener's connections (with upgrades, for CONNECT)
//! and intercepted TLS connections (HTTP/1.1 or HTTP/2 by ALPN). Time-boxes request heads,
//! bounds HTTP/2 streams and closes connections idle (no request in flight) for `idle_timeout`
//! or whose agent has taken no byte for `send_timeout`; never time-boxes a streaming body
//! that is merely quiet. An HTTP/1 agent that half-closes still gets what is ready for it
//! (`HalfClose`).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::UPGRADE;
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::places::Stranger;
use crate::proxy::body::ProxyBody;
use crate::proxy::fragment::{FragmentInTarget, FragmentLog, Sniff};
use crate::proxy::handle::ConnSlot;
use crate::proxy::record::Unparsed;
use crate::state::State;

/// Serves one connection of the plain proxy listener until it closes or keyward shuts down.
/// Returns what ended the connection when that was a request head it could not parse (that
/// request never reached the service, so the caller records it).
pub async fn serve_plain<S>(
    state: &State,
    stream: TcpStream,
    svc: S,
    stranger: Stranger,
    agent: Arc<AgentSide>,
) -> Option<Unparsed>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    let _ = stream.set_nodelay(true);
    let settings = &state.settings;
    let stranger = Arc::new(stranger);
    let activity = Arc::new(Activity::new(Some(stranger.clone()), agent));
    // Nothing of hyper's is built before the client's first bytes arrive: a connection that
    // stays silent holds ~3 KiB instead of ~12 (hyper's buffers). Nothing is in flight, so
    // any end closes at once; the head's time counts from the connection's start, as hyper's
    // would have.
    // (`peek`, not `readable`: a new socket reads as readable before any byte came.)
    let mut first = [0u8; 1];
    tokio::select! {
        peeked = stream.peek(&mut first) => if !peeked.is_ok_and(|n| n > 0) {
            return None;
        },
        _ = activity.lapsed(settings) => return None,
        () = stranger.crowded_out() => return None,
        () = state.stopped() => return None,
    }
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size(settings.parser_head_limit())
        .keep_alive(true);
    let fragments = Arc::new(FragmentLog::default());
    let svc = Tracked {
        inner: svc,
        activity: activity.clone(),
        fragments: fragments.clone(),
    };
    // Tunnels and relays this connection becomes (and TLS intercepted on it) write through
    // the same deadline.
    let stream = SendDeadline::new(stream, settings.send_timeout);
    let conn = builder
        .serve_connection(
            TokioIo::new(HalfClose {
                inner: Sniff::new(stream, fragments.clone()),
                activity: activity.clone(),
            }),
            svc,
        )
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        ended = conn.as_mut() => {
            if fragments.saw_other_protocol() {
                return Some(Unparsed::Http2Preface);
            }
            return ended.err().and_then(|e| unparsed(&e));
        }
        // (hyper's head timer began only at the first bytes: `lapsed` keeps the first head to
        // `header_read_timeout` from the start.)
        lapse = activity.lapsed(settings) => if lapse == Lapse::NoFirstRequest {
            return None;
        },
        // Nothing of a request to finish: closed at once.
        () = stranger.crowded_out() => return None,
        // Nothing in flight (a head still arriving is no request yet): closed at once, or a
        // client with one byte sent would hold the stop for the whole drain.
        () = state.stopped() => if activity.is_idle() {
            return None;
        },
    }
    conn.as_mut().graceful_shutdown();
    // Bounded by the drain at shutdown (which a second signal cuts short), else (an idle or
    // closed connection) by as long as a drain would take.
    tokio::select! {
        _ = conn => {}
        () = state.drain_ended() => {}
        () = tokio::time::sleep(settings.shutdown_timeout) => {}
    }
    None
}

/// A request head hyper could not parse, with the status it answered (it answers those
/// itself), or the HTTP/2 preface, which it answers by closing.
fn unparsed(e: &hyper::Error) -> Option<Unparsed> {
    if e.is_parse_version_h2() {
        Some(Unparsed::Http2Preface)
    } else if e.is_parse_too_large() {
        Some(Unparsed::Head(431))
    } else if e.is_parse() {
        Some(Unparsed::Head(400))
    } else {
        None
    }
}

/// How long after the drain (`proxy.shutdown_timeout`) shutdown still waits for the
/// connections it cut to end: cutting one drops its requests, whose records are written as
/// they drop (outcome `shutdown`), and the audit log must not close before they are queued.
pub const CUT_GRACE: Duration = Duration::from_secs(2);

/// Waits, at most until the drain ends (`proxy.shutdown_timeout`, or a second signal) and
/// `CUT_GRACE` after, until every one of a listener's
/// `capacity` connection permits is back: its connections (and the tunnels and HTTP/2
/// streams they became) have ended, on their own or cut when the drain ran out. Called once
/// the listener stopped accepting; without it the runtime would drop requests still in flight
/// at exit, and their records with them.
pub async fn drain(state: &State, limit: &tokio::sync::Semaphore, capacity: usize) {
    let all = u32::try_from(capacity).unwrap_or(u32::MAX);
    let cut_and_recorded = async {
        state.drain_ended().await;
        tokio::time::sleep(CUT_GRACE).await;
    };
    tokio::select! {
        _ = limit.acquire_many(all) => {}
        () = cut_and_recorded => {}
    }
}

/// What ends an intercepted tunnel from outside.
pub struct TunnelEnds {
    /// A close keyward asks for (after a 407 or a flooding refusal).
    pub close: Arc<Notify>,
    /// The tunnel's task: revoked or expired, its requests are cut.
    pub task: Arc<crate::tasks::Task>,
    /// Tells the requests in flight that the task was cut (`TunnelCtx::cut`).
    pub cut: tokio::sync::watch::Sender<bool>,
}

/// Serves the HTTP inside an intercepted tunnel until it closes, `ends.close` is notified (an
/// authentication failure inside the tunnel), or keyward shuts down. Returns what
/// `serve_plain` returns. A task that ends does not close an idle tunnel: SPEC §4.2 answers
/// its next request with the 407 that says why, then closes; what it has in flight is cut
/// (see `cut_watch` below).
pub async fn serve_intercepted<I, S>(
    state: &Arc<State>,
    mut io: I,
    h2: bool,
    svc: S,
    ends: TunnelEnds,
    slot: ConnSlot,
    agent: Arc<AgentSide>,
) -> Option<Unparsed>
where
    I: tokio::io::AsyncBufRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    let settings = &state.settings;
    let TunnelEnds {
        close,
        task,
        cut: cut_tx,
    } = ends;
    let activity = Arc::new(Activity::new(None, agent));
    let fragments = Arc::new(FragmentLog::default());
    if h2 {
        // HPACK-coded heads cannot be sniffed (and the h2 crate cuts a `:path` fragment too).
        fragments.stop();
    }
    let svc = Tracked {
        inner: svc,
        activity: activity.clone(),
        fragments: fragments.clone(),
    };
    // Nothing of hyper's is built before the client's first bytes can be read (they are not
    // taken: hyper reads them whole): its buffers (16 KiB) would be held by every connection
    // that has yet to send a request. Nothing is in flight, so any end closes at once.
    let first_bytes = std::future::poll_fn(|cx| {
        Pin::new(&mut io)
            .poll_fill_buf(cx)
            .map(|read| read.is_ok_and(|bytes| !bytes.is_empty()))
    });
    tokio::select! {
        // End of stream or a TLS error: hyper would have ended there too, with nothing to
        // record.
        readable = first_bytes => if !readable {
            return None;
        },
        _ = activity.lapsed(settings) => return None,
        () = state.stopped() => return None,
    }
    // `Sniff` holds the client to the protocol ALPN chose, so hyper's builder for that one
    // serves it (not hyper-util's `auto`, which reads the first bytes to guess and handed them
    // on as a short first read, doubling the read buffer every idle connection keeps).
    let io = Sniff::for_alpn(io, fragments.clone(), h2);
    let mut conn = if h2 {
        let executor = StreamExecutor {
            state: state.clone(),
            slot,
            cut: cut_tx.subscribe(),
        };
        let mut builder = hyper::server::conn::http2::Builder::new(executor);
        builder
            .timer(TokioTimer::new())
            // A tunnel is one task's: more streams than it may have in flight would only be
            // refused (429), so an HTTP/2 client is told to queue them instead.
            .max_concurrent_streams(settings.max_task_in_flight.min(128))
            .max_header_list_size(u32::try_from(settings.parser_head_limit()).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(32)
            .keep_alive_interval(Some(Duration::from_secs(30)));
        Intercepted::H2(Box::pin(builder.serve_connection(TokioIo::new(io), svc)))
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .max_buf_size(settings.parser_head_limit());
        let io = TokioIo::new(HalfClose {
            inner: io,
            activity: activity.clone(),
        });
        Intercepted::H1(Box::pin(builder.serve_connection(io, svc).with_upgrades()))
    };
    // SECURITY (I3): a revoked or expired task's requests stop at once: the cut is sent to
    // them (a request waiting on its upstream answers its 407, `handle`). A response the
    // agent does not take (an HTTP/2 stream whose window it never opens, a socket it does not
    // read while the kernel buffer still has room) is not polled, so it cannot notice by
    // itself: after a moment for what ends on its own (those 407s), HTTP/2 streams still open
    // are dropped (reset, recorded) and an HTTP/1 connection with a response still out is
    // closed. An idle connection stays: its next request gets the 407 (SPEC §4.2).
    let cut_watch = async {
        task.cut().await;
        let _ = cut_tx.send(true);
        tokio::time::sleep(CLOSE_GRACE).await;
        if h2 || activity.is_idle() {
            std::future::pending::<()>().await;
        }
    };
    tokio::pin!(cut_watch);
    // How long the graceful close may take: as long as a drain would, but for a close keyward
    // asked for itself.
    let mut grace = settings.shutdown_timeout;
    tokio::select! {
        ended = &mut conn => {
            if fragments.saw_other_protocol() {
                return Some(Unparsed::NotAlpnProtocol);
            }
            // The preface after an HTTP/1.1 request (`Sniff` looks only at the first bytes)
            // is the other protocol than ALPN chose too.
            return match ended.err().and_then(|e| unparsed(&e)) {
                Some(Unparsed::Http2Preface) => Some(Unparsed::NotAlpnProtocol),
                other => other,
            };
        }
        // SECURITY (I7): after a 407 or a flooding refusal. HTTP/2's graceful close waits for
        // the client's PING answer before it stops taking streams, and a client that never
        // answers went on opening streams (each refused and recorded at once) for the whole
        // drain time: it gets a moment to read the answer, then the connection goes.
        _ = close.notified() => grace = CLOSE_GRACE,
        // SECURITY (I7): hyper's head timer does not cover the time before the first bytes,
        // nor HTTP/2: a client silent after the handshake, or that never begins a request,
        // is closed `header_read_timeout` after the tunnel began. Nothing is in flight: at once.
        lapse = activity.lapsed(settings) => if lapse == Lapse::NoFirstRequest {
            return None;
        },
        () = state.stopped() => {
            // HTTP/2's graceful close waits for the client to answer a PING, which an idle
            // (or stuck) client may never do: with nothing in flight, close at once, as an
            // idle HTTP/1 connection is.
            if h2 && activity.is_idle() {
                return None;
            }
        }
        () = &mut cut_watch => return None,
    }
    conn.graceful_shutdown();
    // An HTTP/2 connection whose last stream ends during the drain would still wait for the
    // client's PING answer: once idle it gets a moment to flush its last frames (the select
    // keeps polling it meanwhile), then closes.
    let idle_then_flushed = async {
        activity.until_idle().await;
        tokio::time::sleep(H2_FLUSH_GRACE).await;
    };
    // Bounded by the drain at shutdown (which a second signal cuts short), else (an idle or
    // closed connection) by as long as a drain would take.
    tokio::select! {
        _ = conn => {}
        () = state.drain_ended() => {}
        () = tokio::time::sleep(grace) => {}
        () = idle_then_flushed, if h2 => {}
        () = cut_watch => {}
    }
    None
}

type H1Conn<I, S> =
    hyper::server::conn::http1::UpgradeableConnection<TokioIo<HalfClose<Sniff<I>>>, Tracked<S>>;
type H2Conn<I, S> =
    hyper::server::conn::http2::Connection<TokioIo<Sniff<I>>, Tracked<S>, StreamExecutor>;

/// An intercepted connection as ALPN chose it, each boxed so that the tunnel's task holds only
/// the one it serves.
enum Intercepted<I, S>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    H1(Pin<Box<H1Conn<I, S>>>),
    H2(Pin<Box<H2Conn<I, S>>>),
}

impl<I, S> Intercepted<I, S>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    fn graceful_shutdown(&mut self) {
        match self {
            Intercepted::H1(conn) => conn.as_mut().graceful_shutdown(),
            Intercepted::H2(conn) => conn.as_mut().graceful_shutdown(),
        }
    }
}

impl<I, S> Future for Intercepted<I, S>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Output = hyper::Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Intercepted::H1(conn) => conn.as_mut().poll(cx),
            Intercepted::H2(conn) => conn.as_mut().poll(cx),
        }
    }
}

/// How long a tunnel keyward closes (after a 407 or a flooding refusal) is still driven, so
/// that answer reaches the agent.
const CLOSE_GRACE: Duration = Duration::from_millis(500);

/// How long an HTTP/2 connection that went idle during shutdown's drain is still driven, so
/// the frames of its last response leave before it is dropped.
const H2_FLUSH_GRACE: Duration = Duration::from_millis(200);

/// Runs the tasks hyper spawns for an HTTP/2 connection's streams (each streams one response
/// body to the agent). They outlive the connection's own future, so unlike HTTP/1's bodies
/// they are not dropped, and recorded, when shutdown cuts the connection: each holds the
/// connection's place, so shutdown waits for it, and is dropped (its record written with
/// outcome `shutdown`) when the drain runs out. A stream whose agent opens no window for
/// what it owes for `send_timeout` is dropped too (`StreamProgress`).
#[derive(Clone)]
struct StreamExecutor {
    state: Arc<State>,
    slot: ConnSlot,
    /// Changes when the tunnel's task was cut (see `serve_intercepted`): the streams open
    /// then are dropped a moment later.
    cut: tokio::sync::watch::Receiver<bool>,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    fn execute(&self, stream: F) {
        let (state, slot) = (self.state.clone(), self.slot.clone());
        let mut cut = self.cut.clone();
        // Only a cut after it began ends a stream: one begun after the cut is the next
        // request, answered with the 407.
        cut.borrow_and_update();
        let progress = Arc::new(StreamProgress::new());
        let stalled = {
            let (progress, limit) = (progress.clone(), state.settings.send_timeout);
            async move { progress.stalled(limit).await }
        };
        let stream = STREAM_PROGRESS.scope(progress, stream);
        tokio::spawn(async move {
            let _slot = slot;
            let cut = async {
                // (An error: the connection is gone, and the stream ends with it.)
                if cut.changed().await.is_err() {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(CLOSE_GRACE).await;
            };
            tokio::select! {
                biased;
                () = stream => {}
                () = state.drain_ended() => {}
                () = cut => {}
                () = stalled => tracing::info!(
                    send_timeout = ?state.settings.send_timeout,
                    "an HTTP/2 agent opened no window for its answer for send_timeout: stream reset"
                ),
            }
        });
    }
}

tokio::task_local! {
    /// The HTTP/2 stream a response is served on (set by `StreamExecutor`; absent on HTTP/1).
    static STREAM_PROGRESS: Arc<StreamProgress>;
}

/// Whether an HTTP/2 stream's response waits on its agent, and since when.
///
/// SECURITY (I7): HTTP/2 flow control is per stream. An agent that never opens one stream's
/// window (while it reads the connection, so `SendDeadline` never fires) left hyper waiting
/// to send that response for ever, holding the task's place in flight and the upstream
/// connection. hyper polls a response body only once the agent's window has room, so a body
/// that was handed its answer (or yielded a frame) and is not polled again waits on the
/// agent; one that returned `Pending` waits on its upstream, which is never cut for being
/// quiet.
struct StreamProgress {
    start: Instant,
    /// Milliseconds after `start` (plus one) since when the response waits on the agent; 0
    /// while it does not.
    owed_since: AtomicU64,
}

impl StreamProgress {
    fn new() -> StreamProgress {
        StreamProgress {
            start: Instant::now(),
            owed_since: AtomicU64::new(0),
        }
    }

    fn owe(&self) {
        let now = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.owed_since.store(now + 1, Ordering::Release);
    }

    fn paid(&self) {
        self.owed_since.store(0, Ordering::Release);
    }

    /// Completes once the response has waited on the agent for `limit` (looked at every
    /// `limit` at most, so within twice that).
    async fn stalled(&self, limit: Duration) {
        loop {
            let owed = self.owed_since.load(Ordering::Acquire);
            let wait = match owed.checked_sub(1) {
                None => limit,
                Some(since) => {
                    let waited = self
                        .start
                        .elapsed()
                        .saturating_sub(Duration::from_millis(since));
                    match limit.checked_sub(waited) {
                        Some(left) if !left.is_zero() => left,
                        _ => return,
                    }
                }
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// Requests in flight on one connection, and since when there have been none.
struct Activity {
    start: Instant,
    in_flight: AtomicUsize,
    /// Whether any request has begun.
    begun: std::sync::atomic::AtomicBool,
    /// Milliseconds after `start` when the last request in flight finished.
    idle_since_ms: AtomicU64,
    /// The connection's listing among its listener's strangers (plain connections), until
    /// its first request.
    stranger: Option<Arc<Stranger>>,
    agent: Arc<AgentSide>,
}

/// What the agent's side of one connection has done, shared by the connection, which reads
/// it, and its requests, which say when they wait on their upstream.
#[derive(Default)]
pub struct AgentSide {
    /// The agent's end of stream was read (it closed, or only half-closed, its side).
    ended: std::sync::atomic::AtomicBool,
    /// The request in flight (HTTP/1: one at a time) waits on its upstream. (HTTP/2's
    /// streams share it too, where it means nothing: `ended` is never set there.)
    awaiting_upstream: std::sync::atomic::AtomicBool,
    /// hyper's read of that end of stream, held (`HalfClose`) until nothing is in flight.
    parked_reader: std::sync::Mutex<Option<std::task::Waker>>,
}

impl AgentSide {
    /// The request in flight waits on its upstream until the guard drops: an agent that ends
    /// its side meanwhile went away, and the request is dropped (`TrackedFuture`). One whose
    /// end of stream came with its request (`nc -N`) is gone already: this never completes,
    /// so nothing is sent, and the request is dropped at once.
    pub async fn awaiting_upstream(&self) -> AwaitingUpstream<'_> {
        self.awaiting_upstream.store(true, Ordering::Release);
        let waiting = AwaitingUpstream(self);
        if self.ended() {
            std::future::pending::<()>().await;
        }
        waiting
    }

    /// Whether the agent's end of stream was read (HTTP/1; never set on HTTP/2).
    fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    /// Holds `waker` until the last request in flight ends (the lock is taken only after the
    /// agent's end of stream, never per request).
    fn park_reader(&self, waker: &std::task::Waker) {
        let mut parked = self
            .parked_reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match parked.as_mut() {
            Some(w) => w.clone_from(waker),
            None => *parked = Some(waker.clone()),
        }
    }

    fn wake_reader(&self) {
        let parked = self
            .parked_reader
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(waker) = parked {
            waker.wake();
        }
    }
}

/// See `AgentSide::awaiting_upstream`.
pub struct AwaitingUpstream<'a>(&'a AgentSide);

impl Drop for AwaitingUpstream<'_> {
    fn drop(&mut self) {
        self.0.awaiting_upstream.store(false, Ordering::Release);
    }
}

impl Activity {
    fn new(stranger: Option<Arc<Stranger>>, agent: Arc<AgentSide>) -> Activity {
        Activity {
            start: Instant::now(),
            in_flight: AtomicUsize::new(0),
            begun: std::sync::atomic::AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            stranger,
            agent,
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        if !self.begun.swap(true, Ordering::AcqRel) {
            // A request with a token, or one refused (and the connection closed): known.
            if let Some(stranger) = &self.stranger {
                stranger.known();
            }
        }
        InFlight(self.clone())
    }

    /// No request in flight (none begun, or every response done).
    fn is_idle(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) == 0
    }

    /// Completes once no request is in flight (looked at every 20 ms: only during a drain).
    async fn until_idle(&self) {
        while !self.is_idle() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Completes when the connection has had no request in flight for `idle_timeout`
    /// (`Idle`; a request whose response is still streaming counts as in flight, however quiet
    /// it is), or when `header_read_timeout` has passed since it started without a request
    /// having begun (`NoFirstRequest`). One timer for both: this is polled with the
    /// connection at every wake-up.
    async fn lapsed(&self, settings: &crate::policy::ProxySettings) -> Lapse {
        loop {
            let elapsed = self.start.elapsed();
            let mut wait = if self.in_flight.load(Ordering::Acquire) > 0 {
                settings.idle_timeout
            } else {
                let since = Duration::from_millis(self.idle_since_ms.load(Ordering::Acquire));
                let idle = elapsed.saturating_sub(since);
                match settings.idle_timeout.checked_sub(idle) {
                    Some(left) if !left.is_zero() => left,
                    _ => return Lapse::Idle,
                }
            };
            if !self.begun.load(Ordering::Acquire) {
                match settings.header_read_timeout.checked_sub(elapsed) {
                    Some(left) if !left.is_zero() => wait = wait.min(left),
                    _ => return Lapse::NoFirstRequest,
                }
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// Why `Activity::lapsed` completed.
#[derive(Debug, PartialEq, Eq)]
enum Lapse {
    Idle,
    NoFirstRequest,
}

/// One request in flight, from the call into the service until its response body is done or
/// dropped (the client went away).
struct InFlight(Arc<Activity>);

impl InFlight {
    /// Whether the agent's end of stream was read while this request was in flight.
    fn agent_ended(&self) -> bool {
        self.0.agent.ended()
    }

    /// Whether it was, and the request waits on its upstream.
    fn left_waiting(&self) -> bool {
        self.agent_ended() && self.0.agent.awaiting_upstream.load(Ordering::Acquire)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = self.0.start.elapsed().as_millis() as u64;
        self.0.idle_since_ms.fetch_max(now, Ordering::AcqRel);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 && self.0.agent.ended() {
            self.0.agent.wake_reader();
        }
    }
}

/// The connection's service, counting requests in flight and marking requests whose target
/// had a fragment.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    fragments: Arc<FragmentLog>,
}

impl<S> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<TrackedBody>;
    type Error = AgentGone;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, mut req: Request<Incoming>) -> Self::Future {
        if self.fragments.take(req.method(), req.uri()) {
            req.extensions_mut().insert(FragmentInTarget);
        }
        // After a successful CONNECT or a 101 the connection carries other bytes than HTTP/1.
        let connect = req.method() == Method::CONNECT;
        let may_switch = connect || req.headers().contains_key(UPGRADE);
        TrackedFuture {
            guard: Some(self.activity.begin()),
            switch: may_switch.then(|| (self.fragments.clone(), connect)),
            inner: Some(Box::pin(self.inner.call(req))),
        }
    }
}

pin_project_lite::pin_project! {
    /// The service's future, handing its in-flight guard on to the response body; it drops
    /// the request when the agent goes away while the request waits on its upstream.
    struct TrackedFuture<F> {
        guard: Option<InFlight>,
        // Set when the request may switch the connection away from HTTP/1.
        switch: Option<(Arc<FragmentLog>, bool)>,
        // Boxed for each request: hyper keeps the slot of the future it holds for the whole
        // connection, and a request's future is large; once written, every idle connection
        // held those pages (8 KiB each after one allowed request; +181 instructions a request).
        // `None` once dropped because the agent went away.
        inner: Option<Pin<Box<F>>>,
    }
}

impl<F> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<ProxyBody>, Infallible>>,
{
    type Output = Result<Response<TrackedBody>, AgentGone>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(Err(AgentGone));
        };
        let Poll::Ready(resp) = inner.as_mut().poll(cx) else {
            // The agent's end of stream came while its request waits on the upstream: it went
            // away (nginx and squid read a half-close so too), and the request is dropped as
            // hyper would (its record says `client_closed`); the error closes the connection.
            // A refusal (whose record is written before it is sent) is still answered.
            if this.guard.as_ref().is_some_and(InFlight::left_waiting) {
                *this.inner = None;
                *this.guard = None;
                return Poll::Ready(Err(AgentGone));
            }
            return Poll::Pending;
        };
        let resp = match resp {
            Ok(resp) => resp,
            Err(never) => match never {},
        };
        if let Some((log, connect)) = this.switch.take() {
            let status = resp.status();
            if status == StatusCode::SWITCHING_PROTOCOLS || (connect && status.is_success()) {
                log.stop();
            }
        }
        let guard = this.guard.take();
        // (HTTP/2: the answer now waits on the agent's window until hyper polls its body.)
        let progress = STREAM_PROGRESS.try_with(Arc::clone).ok();
        if let Some(p) = &progress {
            p.owe();
        }
        Poll::Ready(Ok(resp.map(|body| TrackedBody {
            body,
            guard,
            cutting: false,
            progress,
        })))
    }
}

/// What ends a connection whose agent went away while its request waited on the upstream.
#[derive(Debug, thiserror::Error)]
#[error("the agent closed its connection while its request waited on the upstream")]
pub struct AgentGone;

/// A response body that keeps its request counted as in flight until it is done.
pub struct TrackedBody {
    body: ProxyBody,
    guard: Option<InFlight>,
    /// Set at the first wait after the agent ended its side; the error comes at the next poll.
    cutting: bool,
    /// HTTP/2: the stream's progress, owed while a frame waits on the agent's window.
    progress: Option<Arc<StreamProgress>>,
}

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = <ProxyBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Some(p) = &self.progress {
            p.paid();
        }
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let (Some(p), Poll::Ready(Some(Ok(frame)))) = (&self.progress, &polled) {
            if frame.is_data() {
                p.owe();
            }
        }
        // What is ready is still written to an agent that only half-closed; one whose end of
        // stream came while its answer waits on the upstream went away, as above, and the
        // error ends the connection (the body's drop records `client_closed`). Not at once:
        // hyper drops what it has buffered but not flushed when a body fails, so the error
        // comes at the next poll, after the flush this wake-up lets hyper make.
        if polled.is_pending() && self.guard.as_ref().is_some_and(InFlight::agent_ended) {
            if self.cutting {
                return Poll::Ready(Some(Err("the agent closed its connection".into())));
            }
            self.cutting = true;
            cx.waker().wake_by_ref();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// An HTTP/1 agent connection whose end of stream reaches hyper only once nothing is in
    /// flight.
    ///
    /// hyper (without `half_close`) takes an end of stream read while a request is in flight
    /// for the agent's hang-up and drops the request, even when its answer is ready: a client
    /// that half-closes after its request (`ncat`, `nc -N`, `socat`, a script's
    /// `shutdown(SHUT_WR)`) got nothing back, not even a denial already recorded as sent.
    /// Held here, the end of stream is noted for `TrackedFuture` and `TrackedBody`, which
    /// still answer with what is ready and drop what waits on the upstream (the agent went
    /// away, as hyper and nginx read it); hyper reads it once the last request has ended, and
    /// closes. (hyper's own `half_close` would wait on the upstream instead, and not see an
    /// agent that went away until its answer came.)
    struct HalfClose<I> {
        #[pin]
        inner: I,
        activity: Arc<Activity>,
    }
}

impl<I: tokio::io::AsyncRead> tokio::io::AsyncRead for HalfClose<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let agent = &this.activity.agent;
        if !agent.ended() {
            let before = buf.filled().len();
            match std::task::ready!(this.inner.poll_read(cx, buf)) {
                Ok(()) if buf.filled().len() > before || buf.remaining() == 0 => {
                    return Poll::Ready(Ok(()))
                }
                Ok(()) => {}
                // A TLS agent's TCP end of stream without `close_notify` (Python's
                // `SSLSocket.shutdown(SHUT_WR)` sends that): HTTP/1.1 frames its own
                // messages, so it ends the agent's side like any other end of stream.
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            agent.ended.store(true, Ordering::Release);
        }
        if this.activity.is_idle() {
            return Poll::Ready(Ok(()));
        }
        // (Parked, then looked at again, so the last request's end cannot slip between.)
        agent.park_reader(cx.waker());
        match this.activity.is_idle() {
            true => Poll::Ready(Ok(())),
            false => Poll::Pending,
        }
    }
}

impl<I: tokio::io::AsyncWrite> tokio::io::AsyncWrite for HalfClose<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

pin_project_lite::pin_project! {
    /// An agent's socket whose writes fail once the agent has taken no byte for `limit`.
    ///
    /// SECURITY (I7): a response (or tunnel, or relay) to an agent that stops reading waits on
    /// a full socket buffer; it is in flight, so `idle_timeout` never ends it, and it would
    /// hold its connection, its upstream connection and its task's place in flight for ever.
    /// The clock runs only while a write waits, so a stream that is merely quiet is never
    /// cut; it starts again when the socket takes bytes again, which the kernel reports once a
    /// good part of its send buffer has drained (nginx's `send_timeout` works the same way).
    pub struct SendDeadline<I> {
        #[pin]
        inner: I,
        limit: Duration,
        // Boxed once, on the first write that has to wait; reset after that.
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        waiting: bool,
    }
}

impl<I> SendDeadline<I> {
    pub fn new(inner: I, limit: Duration) -> SendDeadline<I> {
        SendDeadline {
            inner,
            limit,
            timer: None,
            waiting: false,
        }
    }
}

/// Passes a finished write on (the agent took bytes: the clock stops); for one that must
/// wait, starts the clock if it is not running and fails the write once it runs out.
fn within_deadline<T>(
    polled: Poll<std::io::Result<T>>,
    cx: &mut Context<'_>,
    limit: Duration,
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    waiting: &mut bool,
) -> Poll<std::io::Result<T>> {
    if polled.is_ready() {
        *waiting = false;
        return polled;
    }
    if !*waiting {
        *waiting = true;
        let deadline = tokio::time::Instant::now() + limit;
        match timer {
            Some(t) => t.as_mut().reset(deadline),
            None => *timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }
    if !timer
        .as_mut()
        .is_some_and(|t| t.as_mut().poll(cx).is_ready())
    {
        return Poll::Pending;
    }
    tracing::info!(
        send_timeout = ?limit,
        "an agent took no byte of what keyward sent it for send_timeout: connection closed"
    );
    Poll::Ready(Err(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        "the agent stopped reading (send_timeout)",
    )))
}

impl<I: tokio::io::AsyncRead> tokio::io::AsyncRead for SendDeadline<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        self.project().inner.poll_read(cx, buf)
    }
}

impl<I: tokio::io::AsyncWrite> tokio::io::AsyncWrite for SendDeadline<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write(cx, buf);
        within_deadline(polled, cx, *this.limit, this.timer, this.waiting)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.inner.poll_write_vectored(cx, bufs);
        within_deadline(polled, cx, *this.limit, this.timer, this.waiting)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let polled = this.inner.poll_flush(cx);
        within_deadline(polled, cx, *this.limit, this.timer, this.waiting)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.project();
        let polled = this.inner.poll_shutdown(cx);
        within_deadline(polled, cx, *this.limit, this.timer, this.waiting)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_slow_reader_is_served_and_a_stopped_one_cut_off() {
        let (ours, mut agent) = tokio::io::duplex(64);
        let mut ours = SendDeadline::new(ours, Duration::from_millis(200));
        let reader = tokio::spawn(async move {
            // 16 bytes every 100 ms: 2 s for the 320 bytes, ten times the deadline, but never
            // 200 ms without taking a byte.
            let mut buf = [0u8; 16];
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                agent.read_exact(&mut buf).await.unwrap();
            }
            agent // then it stops reading, and keeps the pipe open
        });
        ours.write_all(&[b'x'; 320]).await.unwrap();
        let _agent = reader.await.unwrap();
        let started = tokio::time::Instant::now();
        // The 64-byte pipe is full after the first write; the next waits, and fails once the
        // deadline has passed since the agent's last read.
        let mut sent = 0;
        let err = loop {
            match ours.write(&[b'y'; 64]).await {
                Ok(n) => sent += n,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert_eq!(sent, 64);
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(200) && waited < Duration::from_millis(300),
            "{waited:?}"
        );
    }
}
