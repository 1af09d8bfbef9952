//! Bodies that stream through keyward: counted on the way, never buffered.
//!
//! `CountingBody` wraps a request body going upstream; `ProxyBody` is what the agent receives:
//! either a small body keyward wrote (a denial) or the upstream's body streamed frame by frame,
//! which finishes the request's audit record when it ends or when the agent goes away.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::proxy::record::Recorder;
use crate::proxy::redact::Redactor;

/// How a request body going upstream fared: bytes sent, and whether the agent's side of it
/// broke (a malformed chunked body, a hang-up mid-body), so that is not blamed on the upstream.
#[derive(Default)]
pub struct Upload {
    bytes: AtomicU64,
    agent_failed: AtomicBool,
    agent_hung_up: AtomicBool,
    /// Set when the task ended (revoked, expired) while the body was still being sent.
    cut: std::sync::OnceLock<crate::tasks::TaskEnd>,
}

impl Upload {
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Whether the agent's body broke off (malformed, or the agent went away).
    pub fn agent_failed(&self) -> bool {
        self.agent_failed.load(Ordering::Relaxed)
    }

    /// Whether it broke off because the agent went away (its connection or stream closed
    /// mid-body), rather than because it was malformed.
    pub fn agent_hung_up(&self) -> bool {
        self.agent_hung_up.load(Ordering::Relaxed)
    }

    /// How the task ended, if that cut the body short.
    pub fn cut_by(&self) -> Option<crate::tasks::TaskEnd> {
        self.cut.get().copied()
    }
}

/// Tells an agent that went away mid-body from one that sent a malformed body.
pub trait AgentBodyError {
    fn is_hang_up(&self) -> bool;
}

impl AgentBodyError for hyper::Error {
    fn is_hang_up(&self) -> bool {
        if self.is_incomplete_message() || self.is_canceled() {
            return true;
        }
        // HTTP/2: the agent reset its stream (CANCEL) or its connection went.
        let mut source = std::error::Error::source(self);
        while let Some(e) = source {
            if let Some(h2) = e.downcast_ref::<h2::Error>() {
                // (A GOAWAY keyward's HTTP/2 layer sent, for a protocol error, is not one.)
                return h2.is_io()
                    || (h2.is_go_away() && h2.is_remote())
                    || h2.reason() == Some(h2::Reason::CANCEL);
            }
            if let Some(io) = e.downcast_ref::<std::io::Error>() {
                return is_gone(io.kind());
            }
            source = e.source();
        }
        false
    }
}

impl AgentBodyError for std::io::Error {
    fn is_hang_up(&self) -> bool {
        is_gone(self.kind())
    }
}

fn is_gone(kind: std::io::ErrorKind) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        kind,
        UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe
    )
}

/// Counts the data bytes that pass through `inner` into a shared `Upload`, notes an error of
/// the agent's body, and drops trailers.
///
/// SECURITY: request trailers arrive after the decision, are not scanned for `secret_egress`,
/// and could carry a second value for the injected header (`x-api-key: dummy` after the real
/// one) that an upstream merging trailers into headers would use; so they never go upstream.
pub struct CountingBody<B>
where
    B: Body + Unpin,
    B::Error: AgentBodyError,
{
    inner: B,
    upload: Arc<Upload>,
    /// The request's task: a body still streaming when it is revoked or expires goes no
    /// further (the upstream gets a cut-off request, not the rest of a write the operator
    /// stopped).
    task: Option<Arc<crate::tasks::Task>>,
}

impl<B> CountingBody<B>
where
    B: Body + Unpin,
    B::Error: AgentBodyError,
{
    pub fn new(inner: B, upload: Arc<Upload>, task: Option<Arc<crate::tasks::Task>>) -> Self {
        CountingBody {
            inner,
            upload,
            task,
        }
    }
}

impl<B> Body for CountingBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: AgentBodyError + Into<BodyError>,
{
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        loop {
            let polled = Pin::new(&mut self.inner).poll_frame(cx);
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    let end = self.task.as_ref().and_then(|t| t.cut_at(SystemTime::now()));
                    if let Some(end) = end {
                        let _ = self.upload.cut.set(end);
                        return Poll::Ready(Some(Err(end.as_str().into())));
                    }
                    match frame.data_ref() {
                        Some(data) => {
                            self.upload
                                .bytes
                                .fetch_add(data.len() as u64, Ordering::Relaxed);
                        }
                        // Trailers (the only other frame) are dropped; the body goes on.
                        None => continue,
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    self.upload.agent_failed.store(true, Ordering::Relaxed);
                    if e.is_hang_up() {
                        self.upload.agent_hung_up.store(true, Ordering::Relaxed);
                    }
                }
                _ => {}
            }
            return polled.map(|frame| frame.map(|r| r.map_err(Into::into)));
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for CountingBody<B>
where
    B: Body + Unpin,
    B::Error: AgentBodyError,
{
    /// A body dropped before any of it was read may hold its error already: an HTTP/2 stream
    /// whose data overran its own `content-length` in the same read as its head is reset by
    /// the HTTP/2 layer at once, and its request dropped as if the agent had left. One look
    /// tells the record which it was. (The look registers no waker of ours, but may tell the
    /// connection the body is wanted; it is being dropped, so that goes nowhere.)
    fn drop(&mut self) {
        if self.upload.bytes() > 0
            || self.upload.agent_failed()
            || self.inner.is_end_stream()
            || std::thread::panicking()
        {
            return;
        }
        let waker = std::task::Waker::from(Arc::new(NoWake));
        let polled = Pin::new(&mut self.inner).poll_frame(&mut Context::from_waker(&waker));
        if let Poll::Ready(Some(Err(e))) = polled {
            self.upload.agent_failed.store(true, Ordering::Relaxed);
            if e.is_hang_up() {
                self.upload.agent_hung_up.store(true, Ordering::Relaxed);
            }
        }
    }
}

struct NoWake;

impl std::task::Wake for NoWake {
    fn wake(self: Arc<Self>) {}
}

/// The body the agent receives.
// Streaming upstream bodies are the common case; boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
pub enum ProxyBody {
    /// Written by keyward itself (problem documents, admin answers).
    Full(Option<Bytes>),
    /// The upstream's response, streamed; finishes the audit record at its end or on drop.
    Upstream {
        inner: hyper::body::Incoming,
        bytes: u64,
        recorder: Option<Recorder>,
        /// Present when a credential was injected: reflected copies are replaced.
        redactor: Option<Box<Redactor>>,
        /// The upstream body ended; only the redactor's held-back bytes may remain.
        ended: bool,
        /// Trailers wait until the held-back bytes are out.
        trailers: Option<http::HeaderMap>,
        /// The frame's own safe bytes, sent right after the held bytes the frame released.
        queued: Option<Bytes>,
        /// The upstream's `Content-Length`, and the body bytes it sent so far: a body that
        /// ends short is cut, not ended (an HTTP/2 stream reset with `NO_ERROR` reads as an
        /// end, and the agent, its `Content-Length` dropped for redaction, could not tell).
        declared: Option<u64>,
        received: u64,
        /// Made when the upstream first goes quiet: ends when an operator revokes the task,
        /// so a quiet stream is cut then, not at its next frame.
        revoked: Option<Pin<Box<dyn Future<Output = ()> + Send + Sync>>>,
    },
}

/// Fields a trailer section must not carry (they describe the body before it is read).
const DEFERRED_NEVER: [http::header::HeaderName; 6] = [
    http::header::CONTENT_ENCODING,
    http::header::TRANSFER_ENCODING,
    http::header::CONTENT_LENGTH,
    http::header::CONTENT_RANGE,
    // Nor routing or control data (RFC 9110 §6.5.1), nor an invitation around keyward.
    http::header::HOST,
    http::header::ALT_SVC,
];

/// Trailers as relayed to the agent, whether or not the answer was credentialed: what may not
/// be deferred to trailers goes, and so do connection-specific fields (a hop-by-hop name in
/// HTTP/2 trailers is a protocol error, so the agent's stream was reset, though the record
/// said `completed`).
fn clean_trailers(trailers: &mut http::HeaderMap) {
    let _ = crate::proxy::forward::strip_hop_by_hop(trailers);
    for name in DEFERRED_NEVER {
        trailers.remove(name);
    }
}

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(Some(bytes.into()))
    }

    pub fn empty() -> ProxyBody {
        ProxyBody::Full(None)
    }

    /// `declared`: the upstream's `Content-Length` (`None` for a bodyless response).
    pub fn upstream(
        inner: hyper::body::Incoming,
        recorder: Recorder,
        redactor: Option<Box<Redactor>>,
        declared: Option<u64>,
    ) -> ProxyBody {
        ProxyBody::Upstream {
            inner,
            bytes: 0,
            recorder: Some(recorder),
            redactor,
            ended: false,
            trailers: None,
            queued: None,
            declared,
            received: 0,
            revoked: None,
        }
    }
}

/// Why a response stopped before its end (hyper aborts it: the agent cannot take it for whole).
type BodyError = Box<dyn std::error::Error + Send + Sync>;

/// Writes the record of a response that ended (once: the recorder is taken).
fn finish(
    recorder: &mut Option<Recorder>,
    redactor: &Option<Box<Redactor>>,
    bytes: u64,
    outcome: &'static str,
) {
    if let Some(r) = recorder.take() {
        r.complete(bytes, outcome, redactor.as_ref().map_or(0, |r| r.found()));
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream {
                inner,
                bytes,
                recorder,
                redactor,
                ended,
                trailers,
                queued,
                declared,
                received,
                revoked,
            } => loop {
                if let Some(q) = queued.take().filter(|q| !q.is_empty()) {
                    *bytes += q.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(q))));
                }
                if *ended {
                    let tail = redactor.as_mut().map(|r| r.finish()).unwrap_or_default();
                    if !tail.is_empty() {
                        *bytes += tail.len() as u64;
                        return Poll::Ready(Some(Ok(Frame::data(tail))));
                    }
                    // Trailers are the last frame: hyper polls no further after them.
                    finish(recorder, redactor, *bytes, "completed");
                    return Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(t))));
                }
                match Pin::new(&mut *inner).poll_frame(cx) {
                    // SECURITY: what the redactor holds waits for the next frame or the end,
                    // however long the upstream pauses (see `Redactor::push`). An operator's
                    // revocation cuts the stream at once (at expiry, its next frame does).
                    Poll::Pending => {
                        if revoked.is_none() {
                            let Some(task) = recorder.as_ref().and_then(Recorder::shared_task)
                            else {
                                return Poll::Pending;
                            };
                            *revoked =
                                Some(Box::pin(async move { task.revoked_by_operator().await }));
                        }
                        let Some(cut) = revoked.as_mut() else {
                            return Poll::Pending;
                        };
                        if cut.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        let end = crate::tasks::TaskEnd::Revoked.as_str();
                        finish(recorder, redactor, *bytes, end);
                        return Poll::Ready(Some(Err(end.into())));
                    }
                    Poll::Ready(None) if declared.is_some_and(|d| d != *received) => {
                        finish(recorder, redactor, *bytes, "upstream_error");
                        return Poll::Ready(Some(Err(
                            "the upstream body ended before its Content-Length".into(),
                        )));
                    }
                    Poll::Ready(None) => *ended = true,
                    Poll::Ready(Some(Err(e))) => {
                        finish(recorder, redactor, *bytes, "upstream_error");
                        return Poll::Ready(Some(Err(e.into())));
                    }
                    Poll::Ready(Some(Ok(frame))) => {
                        // SECURITY: a task revoked (or expired) while its response streams gets
                        // nothing more, not even what already arrived. (One a reload withdrew
                        // finishes what it started.)
                        let end = recorder
                            .as_ref()
                            .and_then(Recorder::task)
                            .and_then(|t| t.cut_at(SystemTime::now()));
                        if let Some(end) = end {
                            finish(recorder, redactor, *bytes, end.as_str());
                            return Poll::Ready(Some(Err(end.as_str().into())));
                        }
                        if let Some(d) = frame.data_ref() {
                            *received += d.len() as u64;
                        }
                        let frame = match (frame.into_data(), redactor.as_mut()) {
                            (Ok(data), Some(r)) => {
                                let [held, own] = r.push(data);
                                let (first, then) = match held.is_empty() {
                                    true => (own, None),
                                    false => (held, Some(own)),
                                };
                                *queued = then;
                                if first.is_empty() {
                                    // Everything is held back for now; an empty data frame
                                    // could end a chunked body early, so poll again.
                                    continue;
                                }
                                Frame::data(first)
                            }
                            (Ok(data), None) => Frame::data(data),
                            (Err(frame), r) => match (frame.into_trailers(), r) {
                                (Ok(mut t), Some(r)) => {
                                    crate::proxy::forward::strip_session_grants(&mut t);
                                    r.headers(&mut t);
                                    // RFC 9110 §6.5.1: a coding or framing announced after the
                                    // body cannot apply to it; a client that honoured one would
                                    // decode bytes the redactor saw only encoded.
                                    clean_trailers(&mut t);
                                    *trailers = Some(t);
                                    *ended = true;
                                    continue;
                                }
                                (Ok(mut trailers), None) => {
                                    *ended = true;
                                    clean_trailers(&mut trailers);
                                    finish(recorder, redactor, *bytes, "completed");
                                    Frame::trailers(trailers)
                                }
                                // Neither data nor trailers: nothing hyper produces today.
                                (Err(_), _) => continue,
                            },
                        };
                        if let Some(d) = frame.data_ref() {
                            *bytes += d.len() as u64;
                        }
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Full(b) => b.is_none(),
            // Reported as not ended so the final poll (which records completion) happens.
            ProxyBody::Upstream { .. } => false,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            ProxyBody::Full(None) => SizeHint::with_exact(0),
            // Redaction may change the length: an exact hint from the upstream's Content-Length
            // would make hyper frame the body with a length it no longer has.
            ProxyBody::Upstream {
                redactor: Some(_), ..
            } => SizeHint::default(),
            ProxyBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let ProxyBody::Upstream {
            inner,
            bytes,
            recorder,
            redactor,
            ..
        } = self
        {
            if let Some(r) = recorder.as_ref() {
                // A body hyper never polled because it was empty is complete.
                let outcome = if inner.is_end_stream() {
                    "completed"
                } else {
                    r.cut_outcome()
                };
                finish(recorder, redactor, *bytes, outcome);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn request_trailers_are_dropped_and_data_counted() {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-api-key", http::HeaderValue::from_static("dummy"));
        let frames: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ];
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let upload = Arc::new(Upload::default());
        let collected = CountingBody::new(inner, upload.clone(), None)
            .collect()
            .await
            .unwrap();
        assert!(collected.trailers().is_none());
        assert_eq!(&collected.to_bytes()[..], b"hello");
        assert_eq!(upload.bytes(), 5);
        assert!(!upload.agent_failed());
    }

    /// `hel` then `error` through a counting body: what its `Upload` noted.
    async fn upload_broken_by(error: std::io::Error) -> Arc<Upload> {
        let frames = vec![Ok(Frame::data(Bytes::from_static(b"hel"))), Err(error)];
        let inner = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let upload = Arc::new(Upload::default());
        let counted = CountingBody::new(inner, upload.clone(), None);
        assert!(counted.collect().await.is_err());
        assert_eq!(upload.bytes(), 3);
        upload
    }

    #[tokio::test]
    async fn an_error_of_the_agents_body_is_noted() {
        let upload = upload_broken_by(std::io::Error::other("bad chunk")).await;
        assert!(upload.agent_failed());
        assert!(!upload.agent_hung_up(), "a malformed body is not a hang-up");
        // The agent went away mid-body.
        let upload = upload_broken_by(std::io::ErrorKind::UnexpectedEof.into()).await;
        assert!(upload.agent_failed() && upload.agent_hung_up());
    }
}
