//! WebSocket upgrades: the only upgrade keyward relays (never `h2c` or others), decided like
//! any request, and relayed only after the upstream really answered `101 Switching Protocols`.
//! Once both sides have switched, bytes are copied both ways by `splice`, which passthrough
//! tunnels use too; when a credential was injected, the upstream's frames are read and
//! redacted on the way (`ws_redact`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use http::header::{HeaderValue, CONNECTION, UPGRADE};
use http::request::Parts;
use http::{HeaderMap, Method, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;

use crate::proxy::record::Recorder;
use crate::proxy::redact::Redactor;
use crate::proxy::ws_redact::{RedactedReads, Seen};
use crate::tasks::{Task, TaskEnd};

/// Whether the agent asks for a WebSocket upgrade in the one form that is relayed:
/// HTTP/1.1 `GET` with `Upgrade: websocket` and `Connection: upgrade`.
pub fn wants_websocket(parts: &Parts) -> bool {
    parts.method == Method::GET
        && parts.version == Version::HTTP_11
        && single_token(&parts.headers, UPGRADE)
            .is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        && parts
            .headers
            .get_all(CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

fn single_token(headers: &HeaderMap, name: http::header::HeaderName) -> Option<&str> {
    let mut all = headers.get_all(name).iter();
    let first = all.next()?;
    if all.next().is_some() {
        return None;
    }
    first.to_str().ok().map(str::trim)
}

/// Puts back the two hop-by-hop headers an upgrade needs (after every other one was removed).
pub fn mark_upgrade(headers: &mut HeaderMap) {
    headers.insert(CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
}

/// Relays bytes between the agent and the upstream once both upgrades complete, then finishes
/// the request's audit record with the byte counts. With a `redactor` (a credential was
/// injected), the upstream's messages reach the agent redacted (`ws_redact`).
pub async fn relay<D: Future<Output = ()>>(
    agent: OnUpgrade,
    upstream: OnUpgrade,
    recorder: Recorder,
    ends: Ends<'_, D>,
    redactor: Option<Box<Redactor>>,
) {
    let (agent, upstream) = match tokio::join!(agent, upstream) {
        (Ok(a), Ok(u)) => (TokioIo::new(a), TokioIo::new(u)),
        _ => return recorder.complete(0, "upgrade_failed", 0),
    };
    let Some(redactor) = redactor else {
        let spliced = splice(agent, upstream, ends, None).await;
        return recorder.complete_relay(spliced.from_a, spliced.from_b, outcome(&spliced), 0);
    };
    let seen = Arc::new(Seen::default());
    let upstream = RedactedReads::new(upstream, redactor, seen.clone());
    let spliced = splice(agent, upstream, ends, None).await;
    let outcome = match seen.broken.load(Ordering::Relaxed) {
        true => "websocket_protocol_error",
        false => outcome(&spliced),
    };
    let found = seen.found.load(Ordering::Relaxed);
    recorder.complete_relay(spliced.from_a, spliced.from_b, outcome, found);
}

fn outcome(spliced: &Spliced) -> &'static str {
    match spliced.ended {
        Ended::Closed => "completed",
        other => other.as_str(),
    }
}

/// How a splice ended.
#[derive(Clone, Copy)]
pub enum Ended {
    Closed,
    Reset,
    /// keyward began to shut down: both sides were closed so the record can still be written.
    Shutdown,
    /// Nothing crossed either way for the idle timeout (blind tunnels).
    Idle,
    /// The task was revoked or expired: nothing more may cross on its behalf.
    Task(TaskEnd),
    /// A reload took away what allowed the channel (the route, the grant, the passthrough
    /// host).
    Disallowed,
}

impl Ended {
    /// The record's `outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            Ended::Closed => "closed",
            Ended::Reset => "reset",
            Ended::Shutdown => "shutdown",
            Ended::Idle => "idle",
            Ended::Task(end) => end.as_str(),
            Ended::Disallowed => "policy_changed",
        }
    }
}

/// What ends an open channel (a blind tunnel, a WebSocket relay) from outside, beside either
/// side closing.
pub struct Ends<'t, D> {
    /// Revoked or expired, it takes its channels with it.
    pub task: &'t Task,
    /// keyward began to shut down.
    pub shutdown: watch::Receiver<bool>,
    /// Resolves when a reload no longer allows the channel (`State::until_disallowed`).
    pub disallowed: D,
}

pub struct Spliced {
    /// Bytes read from `a` (sent on to `b`, but for what was still buffered at the end).
    pub from_a: u64,
    pub from_b: u64,
    pub ended: Ended,
}

/// Copies bytes both ways between `a` and `b` until either side closes or fails, `task` ends
/// (revoked or expired: "revoke at once" covers open tunnels), or keyward begins to shut down
/// (so no tunnel outlives shutdown's drain and loses its record with the runtime).
///
/// The copy runs as its own task: I/O wakes only it, not the futures that wait for the task's
/// end or shutdown (a `select!` over all three would poll them at every wake-up).
/// `idle`: close once no byte crossed either way for that long (checked every `idle`, so
/// between one and two of it).
pub async fn splice<A, B, D>(
    a: A,
    b: B,
    ends: Ends<'_, D>,
    idle: Option<std::time::Duration>,
) -> Spliced
where
    A: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    D: Future<Output = ()>,
{
    let Ends {
        task,
        mut shutdown,
        disallowed,
    } = ends;
    let from_a = Arc::new(AtomicU64::new(0));
    let from_b = Arc::new(AtomicU64::new(0));
    let mut a = Counted {
        io: a,
        read: from_a.clone(),
    };
    let mut b = Counted {
        io: b,
        read: from_b.clone(),
    };
    let mut copy =
        tokio::spawn(async move { tokio::io::copy_bidirectional(&mut a, &mut b).await.is_ok() });
    let quiet = async {
        let Some(idle) = idle else {
            return std::future::pending().await;
        };
        let mut seen = (0, 0);
        loop {
            tokio::time::sleep(idle).await;
            let now = (
                from_a.load(Ordering::Relaxed),
                from_b.load(Ordering::Relaxed),
            );
            if now == seen {
                return;
            }
            seen = now;
        }
    };
    // In this order: a revoked task's channel ends as `task_revoked` even when the reload
    // that revoked it also disallowed the channel.
    let ended = tokio::select! {
        biased;
        copied = &mut copy => match copied {
            Ok(true) => Ended::Closed,
            _ => Ended::Reset,
        },
        end = task.ended() => Ended::Task(end),
        () = disallowed => Ended::Disallowed,
        _ = shutdown.wait_for(|&stopping| stopping) => Ended::Shutdown,
        () = quiet => Ended::Idle,
    };
    // Dropping the copy closes both sides.
    copy.abort();
    Spliced {
        from_a: from_a.load(Ordering::Relaxed),
        from_b: from_b.load(Ordering::Relaxed),
        ended,
    }
}

/// A stream that counts what is read from it (so a splice cut short still knows its bytes).
struct Counted<T> {
    io: T,
    read: Arc<AtomicU64>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.read.fetch_add(read, Ordering::Relaxed);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}
