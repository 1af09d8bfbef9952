//! The writer thread and its handle. Callers serialize a record and hash most of it on their
//! own thread (`write`), then queue it on a bounded channel; one dedicated thread (file I/O never
//! runs on a tokio worker) drains everything queued, chains each line (`seq`, `hash`) into one
//! reused buffer and writes each batch with a single `write_all`.
//!
//! Must never: drop a record to make room (a full queue makes `write` wait), block a tokio
//! worker, or report healthy after a record failed to reach the sink.

use super::chain::{continue_chain, Chain, Encoded};
use super::{AuditError, AuditRecord};
use crate::metrics::Metrics;
use crate::policy::AuditTarget;
use prometheus::IntCounter;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, Notify};

/// The writer stops draining the queue into one batch past this many bytes, which bounds both
/// the buffer and the delay before the first record of a burst hits the file.
const MAX_BATCH_BYTES: usize = 1024 * 1024;
/// Largest queue `open` accepts; more only hides a sink that cannot keep up.
const MAX_CAPACITY: usize = 1 << 20;
/// Messages taken off the queue per round.
const RECV_CHUNK: usize = 512;
/// After a batch smaller than `GATHER_BELOW` records the writer pauses this long before taking
/// the next one, so records gather in the queue. While it pauses it has no waker registered, so
/// a request that queues a record pays no thread wake-up; without the pause a writer faster
/// than its producers parks after every record and each record costs its sender a futex wake
/// (that capped the writer near 160,000 records/s). A record waits at most this long longer.
/// 2 ms rather than less: on a proxy sharing its one CPU with this thread, each pause is two
/// context switches and a write(2) taken from the proxy (0.5 ms cost ~6 % of its requests/s).
const GATHER: Duration = Duration::from_millis(2);
/// A batch at least this large means the queue is busy: take the next one at once.
const GATHER_BELOW: u64 = 256;

/// The longest a caller of `write` waits to hear its record was written; past it the caller
/// goes on (a stuck sink must not hang requests; it fails the health check instead).
const WRITE_WAIT: Duration = Duration::from_secs(5);

/// Below this many free places in the queue, or above `MAX_QUEUED_BYTES` queued, keyward takes
/// no new request (`accepting`): a sink that stalls (a pipe nobody reads, a full disk that
/// blocks) fills the queue, and requests forwarded then would have records that only wait in
/// memory. What is already in flight still has room for its records.
const RESERVE: usize = 1024;
const MAX_QUEUED_BYTES: usize = 32 * 1024 * 1024;
/// A sink that takes longer than this for one write (a full pipe nobody reads, a hung
/// mount) backs the log up at once: otherwise requests go on being answered for as long as
/// the queue has room (tens of thousands), their records waiting on a sink that may never
/// take them.
const WRITE_STALL: Duration = Duration::from_secs(1);
/// How often the writer checks that its path still names the file it writes: records written
/// into a file removed (or moved away) without a reload would be lost unseen.
const PATH_CHECK: Duration = Duration::from_secs(1);

enum Msg {
    /// A record, and who waits to hear it was written.
    Record(Encoded, Option<oneshot::Sender<()>>),
    /// Flush, sync, acknowledge, stop.
    Close(oneshot::Sender<()>),
    /// Write what came before, then open the file path again (after log rotation moved it).
    Reopen(oneshot::Sender<Result<(), String>>),
}

struct Shared {
    healthy: AtomicBool,
    /// Records handed to the log (serialized), written or not.
    handed: AtomicU64,
    written: AtomicU64,
    lost: AtomicU64,
    /// `write_detached` sends still waiting for queue space; `close` waits for them.
    detached_pending: AtomicUsize,
    /// Bytes of records queued and not yet taken by the writer.
    queued_bytes: AtomicUsize,
    /// While the writer is in a `write(2)`: when it began, in ms after `epoch` (plus one, so
    /// that 0 means "not writing").
    writing_since: AtomicU64,
    epoch: std::time::Instant,
    detached_done: Notify,
    /// The writer thread, unparked when someone waits for a write (it may be pausing to gather).
    writer: OnceLock<std::thread::Thread>,
}

impl Shared {
    fn new() -> Self {
        Shared {
            healthy: AtomicBool::new(true),
            handed: AtomicU64::new(0),
            written: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            detached_pending: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            writing_since: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            detached_done: Notify::new(),
            writer: OnceLock::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether the writer has been inside one write for longer than `WRITE_STALL`.
    fn stalled(&self) -> bool {
        match self.writing_since.load(Ordering::Relaxed) {
            0 => false,
            since => self.now_ms().saturating_sub(since - 1) > WRITE_STALL.as_millis() as u64,
        }
    }

    fn record_lost(&self, why: &'static str) {
        self.healthy.store(false, Ordering::SeqCst);
        let lost = self.lost.fetch_add(1, Ordering::Relaxed) + 1;
        // Log the 1st, 2nd, 4th, 8th, … loss: a dead sink under load must not flood stderr.
        if lost.is_power_of_two() {
            tracing::error!(lost, why, "audit record not written");
        }
    }
}

/// Handle on the audit writer. Cheap to clone; all clones feed the same writer.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("healthy", &self.healthy())
            .field("records_written", &self.records_written())
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens the target (file: append mode, created 0600; `Stdout`: standard output), continues
    /// `seq`/hash from the last record of an existing file, and starts the writer thread behind
    /// a queue of `capacity` records (clamped to 1..=2^20).
    pub async fn open(
        target: &AuditTarget,
        capacity: usize,
        metrics: &Metrics,
    ) -> Result<AuditLog, AuditError> {
        // tokio refuses (panics on) a zero or absurdly large capacity.
        let (tx, rx) = mpsc::channel(capacity.clamp(1, MAX_CAPACITY));
        let shared = Arc::new(Shared::new());
        let (ready_tx, ready_rx) = oneshot::channel();
        let target = target.clone();
        let writer_shared = Arc::clone(&shared);
        let counter = metrics.audit_records_counter();
        // Opening and scanning the tail is blocking file I/O too, so it happens on the writer
        // thread; the result comes back over `ready`.
        std::thread::Builder::new()
            .name("keyward-audit".into())
            .spawn(move || {
                let _ = writer_shared.writer.set(std::thread::current());
                let (sink, chain) = match make_parent(&target).and_then(|()| open_sink(&target)) {
                    Ok(opened) => opened,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if ready_tx.send(Ok(())).is_err() {
                    return; // open() was cancelled
                }
                Writer {
                    target,
                    identity: sink.identity(),
                    size: sink.len(),
                    path_checked: Instant::now(),
                    sink,
                    written: chain.clone(),
                    chain,
                    shared: writer_shared,
                    counter,
                }
                .run(rx);
            })
            .map_err(AuditError::Spawn)?;
        match ready_rx.await {
            Ok(Ok(())) => Ok(AuditLog { tx, shared }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(AuditError::WriterGone),
        }
    }

    /// Queues one record, waiting for space when the queue is full (backpressure), and returns
    /// once the writer has written it to the sink (not synced), so a denial's record exists
    /// before the denial is sent (SPEC §7). The record is serialized and mostly hashed here, on
    /// the caller's thread (see `chain::Encoded`).
    pub async fn write(&self, rec: AuditRecord) {
        // SECURITY (I6): the caller may be dropped while it waits for room (a stream reset, a
        // connection closed): the record is then handed over as `write_detached` would, not
        // lost with the future.
        let mut unsent = Unsent {
            log: self,
            rec: Some(self.encode(rec)),
        };
        // A queue that stays full (a stalled sink) must not hang the answer: past the wait
        // the record is lost, which fails the log closed.
        let permit = match tokio::time::timeout(WRITE_WAIT, self.tx.reserve()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => {
                unsent.rec = None;
                return self.shared.record_lost("audit log closed");
            }
            Err(_) => {
                unsent.rec = None;
                return self.shared.record_lost("audit queue full");
            }
        };
        let Some(encoded) = unsent.rec.take() else {
            return;
        };
        let (written_tx, written) = oneshot::channel();
        permit.send(Msg::Record(encoded, Some(written_tx)));
        if let Some(writer) = self.shared.writer.get() {
            writer.unpark(); // cut a gathering pause short
        }
        // An error means the writer dropped the record (counted as lost there).
        let _ = tokio::time::timeout(WRITE_WAIT, written).await;
    }

    /// For paths that cannot await (a `Drop`): queue now if there is room, else hand the record
    /// to a task that waits for room. Outside a tokio runtime it blocks the calling thread.
    pub fn write_detached(&self, rec: AuditRecord) {
        let encoded = self.encode(rec);
        self.send_detached(encoded);
    }

    /// `write_detached` of a record already encoded.
    fn send_detached(&self, encoded: Encoded) {
        let msg = Msg::Record(encoded, None);
        let msg = match self.tx.try_send(msg) {
            Ok(()) => return,
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.shared.record_lost("audit log closed");
                return;
            }
            Err(mpsc::error::TrySendError::Full(msg)) => msg,
        };
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                let pending = DetachedSend::new(Arc::clone(&self.shared));
                let tx = self.tx.clone();
                rt.spawn(async move {
                    let mut pending = pending;
                    pending.sent = tx.send(msg).await.is_ok();
                });
            }
            // Not inside a runtime, so blocking this thread cannot stall a tokio worker.
            Err(_) => {
                if self.tx.blocking_send(msg).is_err() {
                    self.shared.record_lost("audit log closed");
                }
            }
        }
    }

    /// Opens the audit file's path again once what is queued before is written (`SIGHUP` and
    /// `POST /v1/reload` do this, for log rotation). Errors leave the old file in use.
    pub async fn reopen(&self) -> Result<(), String> {
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.tx.send(Msg::Reopen(ack_tx)).await.is_err() {
            return Err("the audit log is closed".into());
        }
        if let Some(writer) = self.shared.writer.get() {
            writer.unpark();
        }
        ack_rx
            .await
            .unwrap_or_else(|_| Err("the audit writer stopped".into()))
    }

    /// False once a write to the sink failed or a record could not be queued; it never turns
    /// true again (the chain on disk may be torn), so a restart is required.
    pub fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::SeqCst)
    }

    /// Whether a new request may be taken: the log is healthy and its queue is not backed up
    /// (see `RESERVE`). Turns true again once the writer catches up.
    pub fn accepting(&self) -> bool {
        self.healthy() && !self.backed_up()
    }

    /// Whether the queue is backed up (see `RESERVE`): the writer is behind, not failed.
    pub fn backed_up(&self) -> bool {
        self.tx.capacity() < RESERVE.min(self.tx.max_capacity() / 2)
            || self.shared.queued_bytes.load(Ordering::Relaxed) >= MAX_QUEUED_BYTES
            || self.shared.stalled()
    }

    /// Serializes and mostly hashes a record on the caller's thread (see `chain::Encoded`),
    /// counting its bytes as queued.
    fn encode(&self, mut rec: AuditRecord) -> Encoded {
        if rec.ts.is_empty() {
            rec.ts = AuditRecord::now_ts();
        }
        // Every decision in keyward's own log too, at `debug` (`RUST_LOG=keyward=debug`):
        // what an operator follows live. The record's fields, already scrubbed (never a query
        // string: `path` may still hold one here).
        tracing::debug!(
            request_id = %rec.request_id,
            task = rec.task.as_deref().unwrap_or(""),
            agent = rec.agent.as_deref().unwrap_or(""),
            decision = rec.decision,
            reason = rec.reason,
            method = %rec.method,
            host = %rec.host,
            path = rec.path.split('?').next().unwrap_or(""),
            capability = rec.capability.as_deref().unwrap_or(""),
            status = rec.status,
            outcome = rec.outcome.unwrap_or(""),
            "decision"
        );
        let encoded = Encoded::new(&rec);
        self.shared.handed.fetch_add(1, Ordering::Relaxed);
        self.shared
            .queued_bytes
            .fetch_add(encoded.len(), Ordering::Relaxed);
        encoded
    }

    /// Records that reached the sink (written to the OS) so far.
    pub fn records_written(&self) -> u64 {
        self.shared.written.load(Ordering::SeqCst)
    }

    /// Records lost since start (not written, for whatever reason).
    pub fn lost(&self) -> u64 {
        self.shared.lost.load(Ordering::Relaxed)
    }

    /// Records handed to the log and not written (yet): lost, or still queued.
    pub fn unwritten(&self) -> u64 {
        let handed = self.shared.handed.load(Ordering::Relaxed);
        handed.saturating_sub(self.shared.written.load(Ordering::SeqCst))
    }

    /// Writes everything queued so far (including detached writes still waiting for room),
    /// syncs the file and stops the writer. Records sent afterwards are lost and make the log
    /// unhealthy. A second call returns at once.
    pub async fn close(&self) {
        loop {
            let done = self.shared.detached_done.notified();
            tokio::pin!(done);
            done.as_mut().enable();
            if self.shared.detached_pending.load(Ordering::SeqCst) == 0 {
                break;
            }
            done.await;
        }
        let (ack_tx, ack_rx) = oneshot::channel();
        if self.tx.send(Msg::Close(ack_tx)).await.is_ok() {
            let _ = ack_rx.await;
        }
    }
}

/// A record `write` has not queued yet: sent detached if `write` is dropped first.
struct Unsent<'a> {
    log: &'a AuditLog,
    rec: Option<Encoded>,
}

impl Drop for Unsent<'_> {
    fn drop(&mut self) {
        if let Some(rec) = self.rec.take() {
            self.log.send_detached(rec);
        }
    }
}

/// Tracks one spawned `write_detached` send. Dropped when the send finished — or when the task
/// was dropped unpolled because the runtime is shutting down, which must still count as a loss
/// and must not leave `close` waiting forever.
struct DetachedSend {
    shared: Arc<Shared>,
    sent: bool,
}

impl DetachedSend {
    fn new(shared: Arc<Shared>) -> Self {
        shared.detached_pending.fetch_add(1, Ordering::SeqCst);
        DetachedSend {
            shared,
            sent: false,
        }
    }
}

impl Drop for DetachedSend {
    fn drop(&mut self) {
        if !self.sent {
            self.shared.record_lost("audit log closed");
        }
        if self.shared.detached_pending.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.shared.detached_done.notify_waiters();
        }
    }
}

enum Sink {
    /// `regular` is false for a device or pipe (`/dev/stdout`, a FIFO): no tail to continue
    /// and nothing to fsync.
    File {
        file: File,
        regular: bool,
    },
    Stdout(io::Stdout),
}

impl Sink {
    fn write_batch(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            Sink::File { file, .. } => file.write_all(buf),
            Sink::Stdout(out) => {
                let mut out = out.lock();
                out.write_all(buf)?;
                out.flush()
            }
        }
    }

    /// How many names the open regular file still has (0: removed).
    fn identity_links(&self) -> Option<u64> {
        use std::os::unix::fs::MetadataExt;
        match self {
            Sink::File {
                file,
                regular: true,
            } => file.metadata().ok().map(|m| m.nlink()),
            _ => None,
        }
    }

    /// Length of a regular file (0 for the rest).
    fn len(&self) -> u64 {
        match self {
            Sink::File {
                file,
                regular: true,
            } => file.metadata().map_or(0, |m| m.len()),
            _ => 0,
        }
    }

    /// Device and inode of a regular file (what its path must still name).
    fn identity(&self) -> Option<(u64, u64)> {
        use std::os::unix::fs::MetadataExt;
        match self {
            Sink::File {
                file,
                regular: true,
            } => file.metadata().ok().map(|m| (m.dev(), m.ino())),
            _ => None,
        }
    }

    /// Lets go of the regular file's lock (`lock`), before opening its path again.
    fn unlock(&self) {
        self.flock(rustix::fs::FlockOperation::Unlock);
    }

    /// Takes the lock back when the file stays in use after all (best effort: the other
    /// process that could take it meanwhile would have to start in that instant).
    fn relock(&self) {
        self.flock(rustix::fs::FlockOperation::NonBlockingLockExclusive);
    }

    fn flock(&self, op: rustix::fs::FlockOperation) {
        if let Sink::File {
            file,
            regular: true,
        } = self
        {
            let _ = rustix::fs::flock(file, op);
        }
    }

    fn sync(&mut self) -> io::Result<()> {
        match self {
            Sink::File { file, regular } => {
                if *regular {
                    file.sync_data()
                } else {
                    Ok(())
                }
            }
            Sink::Stdout(out) => out.flush(),
        }
    }
}

/// Device and inode of what `path` names now.
fn path_identity(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()))
}

/// At start, the log file's directory is made if it is not there (`audit.path:
/// logs/audit.jsonl` beside a fresh policy), the owner's alone. Not when reopening: a
/// directory gone while keyward runs is a fault to report, not to paper over.
fn make_parent(target: &AuditTarget) -> Result<(), AuditError> {
    let AuditTarget::File(path) = target else {
        return Ok(());
    };
    let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) else {
        return Ok(());
    };
    if parent.is_dir() {
        return Ok(());
    }
    if parent.exists() {
        // (Else creating it fails with "File exists", which points the wrong way.)
        let source = io::Error::other(format!("`{}` is not a directory", parent.display()));
        return Err(AuditError::Open {
            path: path.clone(),
            source,
        });
    }
    let mut dirs = std::fs::DirBuilder::new();
    dirs.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        dirs.mode(0o700);
    }
    dirs.create(parent).map_err(|source| AuditError::Open {
        path: path.clone(),
        source,
    })
}

fn open_sink(target: &AuditTarget) -> Result<(Sink, Chain), AuditError> {
    match target {
        AuditTarget::Stdout => {
            // SECURITY (fail closed): no record may go nowhere unseen.
            if discards(rustix::fs::fstat(io::stdout())) {
                return Err(AuditError::Discarded(
                    "audit.path is \"-\" and standard output is /dev/null or the like (closed when keyward started?)",
                ));
            }
            Ok((Sink::Stdout(io::stdout()), Chain::default()))
        }
        AuditTarget::File(path) => {
            let mut opts = OpenOptions::new();
            opts.append(true).create(true);
            #[cfg(unix)]
            {
                use std::os::unix::fs::OpenOptionsExt;
                // SECURITY: records show who called what; not for other local users.
                opts.mode(0o600);
            }
            let open_err = |source| AuditError::Open {
                path: path.clone(),
                source,
            };
            let mut file = opts.open(path).map_err(open_err)?;
            let meta = file.metadata().map_err(open_err)?;
            if discards(rustix::fs::fstat(&file)) {
                return Err(AuditError::Discarded(
                    "audit.path names a device that discards what is written (/dev/null, /dev/zero, /dev/urandom…)",
                ));
            }
            if meta.is_file() {
                lock(&file, path)?;
            } else {
                // A device or pipe: nothing to read back, so the chain starts afresh.
                let sink = Sink::File {
                    file,
                    regular: false,
                };
                return Ok((sink, Chain::default()));
            }
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    tracing::warn!(
                        path = %path.display(),
                        mode = format_args!("{mode:o}"),
                        "audit log is readable or writable by other users; run `chmod 600` on it"
                    );
                }
            }
            // A separate read-only handle: the append handle may not be readable.
            let mut reader = File::open(path).map_err(open_err)?;
            let (chain, torn_tail) = continue_chain(&mut reader, path)?;
            if torn_tail {
                // End the torn line so the next record starts on its own line.
                file.write_all(b"\n").map_err(open_err)?;
            }
            let sink = Sink::File {
                file,
                regular: true,
            };
            Ok((sink, chain))
        }
    }
}

/// SECURITY (tamper evidence): two writers appending to one file interleave two chains (two
/// `seq` 8s, hashes that do not follow), and `audit verify` reads honest records as tampered.
/// An exclusive `flock` on the file, held while it is open, makes a second keyward (a copy of
/// a policy that names the same path) refuse to start. A filesystem without locks (some
/// network ones) is only warned about.
fn lock(file: &File, path: &std::path::Path) -> Result<(), AuditError> {
    match rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(AuditError::InUse {
            path: path.to_path_buf(),
        }),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot lock the audit log; make sure no other process writes to it");
            Ok(())
        }
    }
}

/// Whether an open file is one of the kernel's memory devices (character devices of major
/// number 1: /dev/null, /dev/zero, /dev/random, /dev/urandom, under any name), which take
/// writes and keep nothing: what the Rust runtime puts on standard output when keyward was
/// started with it closed (`>&-`), and where records would go unseen. Not /dev/full (minor
/// 7): its writes fail, and so the log does, closed.
pub(crate) fn discards(open: rustix::io::Result<rustix::fs::Stat>) -> bool {
    open.is_ok_and(|st| {
        rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::CharacterDevice
            && rustix::fs::major(st.st_rdev) == 1
            && rustix::fs::minor(st.st_rdev) != 7
    })
}

struct Writer {
    target: AuditTarget,
    /// Device and inode of the regular file the writer has open (see `PATH_CHECK`).
    identity: Option<(u64, u64)>,
    /// How long that file is, as far as the writer knows: shorter on disk means it was
    /// truncated under it (logrotate's `copytruncate`).
    size: u64,
    path_checked: Instant,
    sink: Sink,
    chain: Chain,
    /// Where the chain stood after the last batch that reached the sink.
    written: Chain,
    shared: Arc<Shared>,
    counter: IntCounter,
}

impl Writer {
    fn run(mut self, mut rx: mpsc::Receiver<Msg>) {
        let mut msgs = Vec::with_capacity(RECV_CHUNK);
        let mut waiters = Vec::new();
        let mut buf = Vec::with_capacity(64 * 1024);
        loop {
            // Block for the first message, then take whatever else is already queued.
            if rx.blocking_recv_many(&mut msgs, RECV_CHUNK) == 0 {
                self.finish(None);
                return; // every AuditLog handle is gone
            }
            // Between batches: nothing is chained to the old file yet. A reopen asked for
            // (logrotate's SIGHUP after it moved the file) follows the move itself, after the
            // records queued before it went to the moved file: no warning for a rotation.
            if !msgs.iter().any(|m| matches!(m, Msg::Reopen(_))) {
                self.check_path();
            }
            let mut batch = 0u64;
            let mut close = None;
            loop {
                for msg in msgs.drain(..) {
                    match msg {
                        Msg::Record(rec, waiter) if close.is_none() => {
                            batch += u64::from(self.append(rec, &mut buf));
                            waiters.extend(waiter);
                        }
                        Msg::Record(..) => self.shared.record_lost("sent after close"),
                        Msg::Reopen(ack) => {
                            // Records queued before the reopen belong to the old file.
                            self.flush_batch(&mut buf, batch);
                            batch = 0;
                            let _ = ack.send(self.reopen());
                        }
                        Msg::Close(ack) => close = close.or(Some(ack)),
                    }
                }
                if close.is_some() || buf.len() >= MAX_BATCH_BYTES {
                    break;
                }
                while msgs.len() < RECV_CHUNK {
                    match rx.try_recv() {
                        Ok(msg) => msgs.push(msg),
                        Err(_) => break,
                    }
                }
                if msgs.is_empty() {
                    break; // the queue is empty: write what we have
                }
            }
            self.flush_batch(&mut buf, batch);
            for waiter in waiters.drain(..) {
                let _ = waiter.send(());
            }
            if close.is_some() {
                // Whatever other handles queued after the close cannot be written any more;
                // count it rather than drop it silently with the receiver.
                rx.close();
                while let Ok(msg) = rx.try_recv() {
                    if let Msg::Record(..) = msg {
                        self.shared.record_lost("sent after close");
                    }
                }
                self.finish(close);
                return;
            }
            if batch < GATHER_BELOW {
                // `write` unparks the thread: a record someone waits for is not held back.
                std::thread::park_timeout(GATHER);
            }
        }
    }

    /// Syncs the current file and opens the target path again: a rotated (moved) file is left
    /// complete, and a new file at the path starts its own chain at `seq` 1 (or continues the
    /// file found there). On failure the old file stays in use.
    /// A path that still names the open file, whole, is left as it is: nothing was rotated (a
    /// reload without rotation, or a rotation the path check already followed), and logging
    /// the chain end again would name the new file's, not the rotated one's, as the last. A
    /// file truncated in place (`copytruncate`) is opened again: its chain starts afresh.
    fn reopen(&mut self) -> Result<(), String> {
        let AuditTarget::File(path) = &self.target else {
            return Ok(());
        };
        let whole = std::fs::metadata(path).is_ok_and(|m| m.len() >= self.size);
        if self.identity.is_some() && path_identity(path) == self.identity && whole {
            return Ok(());
        }
        if let Err(e) = self.sink.sync() {
            tracing::warn!(error = %e, "audit log sync before reopening failed");
        }
        // The path may name the open file again (truncated in place): its lock is this
        // writer's, held through another open file, so let go of it first.
        self.sink.unlock();
        let (sink, chain) = match open_sink(&self.target) {
            Ok(opened) => opened,
            Err(e) => {
                self.sink.relock();
                return Err(e.to_string());
            }
        };
        self.log_chain_end("reopened");
        self.identity = sink.identity();
        self.size = sink.len();
        self.sink = sink;
        self.written = chain.clone();
        self.chain = chain;
        Ok(())
    }

    /// SECURITY: records written into a file that was removed, or moved away without a
    /// reload, are lost unseen. At most once a `PATH_CHECK`, the path must still name the open
    /// file; else it is opened again (a new file there starts its own chain), and if that
    /// fails the log fails: requests are refused rather than recorded nowhere.
    fn check_path(&mut self) {
        let (Some(identity), AuditTarget::File(path)) = (self.identity, &self.target) else {
            return;
        };
        if self.path_checked.elapsed() < PATH_CHECK {
            return;
        }
        self.path_checked = Instant::now();
        if path_identity(path) == Some(identity) {
            return;
        }
        let here = std::fs::metadata(path);
        // A path that cannot be looked at (a directory made unreadable, a file where the
        // directory was) may still name the open file: only one removed for sure counts then.
        let removed = self.sink.identity_links() == Some(0);
        let missing = matches!(&here, Err(e) if e.kind() == io::ErrorKind::NotFound);
        if here.is_err() && !missing && !removed {
            return;
        }
        tracing::warn!(path = %path.display(), "the audit file was removed, moved or replaced; opening its path again");
        // Only a regular file is opened again (a FIFO put there would block the writer).
        let reopened = match &here {
            Ok(m) if !m.is_file() => Err("the audit path is no longer a regular file".to_owned()),
            _ => self.reopen(),
        };
        if let Err(e) = reopened {
            self.shared.healthy.store(false, Ordering::SeqCst);
            tracing::error!(error = %e, "cannot open the audit file again; requests are refused until keyward is restarted");
        }
    }

    /// Logs where the chain stands, so an operator (or a log collector) keeps the last hash
    /// outside the file: the chain alone cannot show that records were cut off its end.
    fn log_chain_end(&self, why: &'static str) {
        let hash = self
            .chain
            .prev
            .as_ref()
            .map(|h| String::from_utf8_lossy(h).into_owned());
        tracing::info!(
            seq = self.chain.seq,
            hash = hash.as_deref().unwrap_or("-"),
            why,
            "audit chain end"
        );
    }

    /// Appends one line to `buf` and advances the chain; false (nothing appended) if the log
    /// already failed.
    fn append(&mut self, rec: Encoded, buf: &mut Vec<u8>) -> bool {
        self.shared
            .queued_bytes
            .fetch_sub(rec.len(), Ordering::Relaxed);
        if !self.shared.healthy.load(Ordering::Relaxed) {
            self.shared.record_lost("audit log failed earlier");
            return false;
        }
        self.chain.append(rec, buf);
        true
    }

    fn flush_batch(&mut self, buf: &mut Vec<u8>, records: u64) {
        if buf.is_empty() {
            return;
        }
        let began = self.shared.now_ms().saturating_add(1);
        self.shared.writing_since.store(began, Ordering::Relaxed);
        let wrote = self.sink.write_batch(buf);
        self.shared.writing_since.store(0, Ordering::Relaxed);
        match wrote {
            Ok(()) => {
                self.shared.written.fetch_add(records, Ordering::SeqCst);
                self.counter.inc_by(records);
                self.written = self.chain.clone();
                self.size += buf.len() as u64;
            }
            Err(e) => {
                // A partial write may have torn a line. Stay failed so the proxy refuses
                // requests instead of logging gaps; the chain goes back to what the file
                // holds, so its logged end names no record that was never written.
                self.chain = self.written.clone();
                self.shared.healthy.store(false, Ordering::SeqCst);
                self.shared.lost.fetch_add(records, Ordering::Relaxed);
                tracing::error!(error = %e, records, "audit log write failed");
            }
        }
        buf.clear();
        // Release a buffer grown by a huge burst instead of holding it for the process' life.
        if buf.capacity() > 4 * MAX_BATCH_BYTES {
            buf.shrink_to(64 * 1024);
        }
    }

    fn finish(&mut self, ack: Option<oneshot::Sender<()>>) {
        if let Err(e) = self.sink.sync() {
            self.shared.healthy.store(false, Ordering::SeqCst);
            tracing::error!(error = %e, "audit log sync failed at close");
        }
        self.log_chain_end("closed");
        // Nothing more is written: a keyward started next may take the file at once.
        self.sink.unlock();
        if let Some(ack) = ack {
            let _ = ack.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::verify_chain;
    use std::path::{Path, PathBuf};

    fn record(i: usize) -> AuditRecord {
        AuditRecord {
            ts: AuditRecord::now_ts(),
            request_id: format!("req-{i}"),
            decision: "deny",
            reason: "unknown_host",
            method: "CONNECT".into(),
            scheme: "https",
            host: "evil.example".into(),
            port: Some(443),
            status: 403,
            client: "127.0.0.1:1".into(),
            policy_version: "0123456789abcdef".into(),
            ..AuditRecord::default()
        }
    }

    fn file_target(dir: &tempfile::TempDir) -> (AuditTarget, PathBuf) {
        let path = dir.path().join("audit.jsonl");
        (AuditTarget::File(path.clone()), path)
    }

    fn verify(path: &Path) -> u64 {
        let file = File::open(path).unwrap();
        verify_chain(io::BufReader::new(file)).unwrap()
    }

    fn seqs(path: &Path) -> Vec<u64> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                    .as_u64()
                    .unwrap()
            })
            .collect()
    }

    /// An audit log (queue of 4,096) writing into a FIFO whose reader reads nothing until
    /// `go` is sent, then everything; the reader returns what it read.
    #[cfg(unix)]
    async fn log_into_unread_pipe(
        dir: &Path,
    ) -> (
        AuditLog,
        std::sync::mpsc::Sender<()>,
        std::thread::JoinHandle<Vec<u8>>,
    ) {
        use std::io::Read as _;
        let path = dir.join("audit.fifo");
        let made = std::process::Command::new("mkfifo").arg(&path).status();
        assert!(made.unwrap().success());
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let reader_path = path.clone();
        let reader = std::thread::spawn(move || {
            let mut pipe = File::open(&reader_path).unwrap();
            wait.recv().unwrap();
            let mut all = Vec::new();
            pipe.read_to_end(&mut all).unwrap();
            all
        });
        let metrics = Metrics::new().unwrap();
        let log = AuditLog::open(&AuditTarget::File(path), 4096, &metrics)
            .await
            .unwrap();
        (log, go, reader)
    }

    /// A write that blocks longer than `WRITE_STALL` backs the log up even while the queue has
    /// room: a few records into a pipe nobody reads, then no new request until it drains.
    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_blocks_backs_the_log_up_with_the_queue_nearly_empty() {
        let dir = tempfile::tempdir().unwrap();
        let (log, go, reader) = log_into_unread_pipe(dir.path()).await;
        // 100 KiB of records: more than the pipe holds, far less than the queue. (Allowed
        // requests' records: a refusal's path is cut to 256 bytes.)
        let mut rec = record(0);
        rec.path = format!("/{}", "p".repeat(2000));
        rec.task = Some("t".into());
        rec.decision = "allow";
        for _ in 0..50 {
            log.write_detached(rec.clone());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while log.accepting() {
            assert!(
                std::time::Instant::now() < deadline,
                "a blocked write never backed the log up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(log.healthy(), "nothing was lost");
        go.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !log.accepting() {
            assert!(std::time::Instant::now() < deadline, "never drained");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        log.close().await;
        let written = reader.join().unwrap();
        assert_eq!(written.iter().filter(|&&b| b == b'\n').count(), 50);
    }

    /// A sink that stops taking bytes (a pipe nobody reads) backs the queue up: keyward then
    /// takes no new request until the writer catches up, and no record is lost.
    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stalled_sink_stops_new_requests_until_it_drains() {
        let dir = tempfile::tempdir().unwrap();
        let (log, go, reader) = log_into_unread_pipe(dir.path()).await;
        assert!(log.accepting());

        // 2 KiB records: the pipe (64 KiB) fills, the writer blocks, the queue fills.
        let mut rec = record(0);
        rec.path = format!("/{}", "p".repeat(2000));
        rec.task = Some("t".into());
        for _ in 0..4096 {
            log.write_detached(rec.clone());
        }
        assert!(!log.accepting(), "a backed-up queue takes no new request");
        assert!(log.backed_up(), "(nor a new connection)");
        assert!(log.healthy(), "nothing was lost");

        go.send(()).unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !log.accepting() {
            assert!(
                std::time::Instant::now() < deadline,
                "the queue never drained"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!log.backed_up());
        log.close().await;
        let written = reader.join().unwrap();
        assert_eq!(written.iter().filter(|&&b| b == b'\n').count(), 4096);
        assert!(log.healthy());
    }

    /// logrotate's `copytruncate` copies the file and truncates it in place: the reopen it
    /// asks for starts a new chain at `seq` 1 in the emptied file (the path still names the
    /// same file, so only its length tells).
    #[tokio::test]
    async fn a_reopen_after_a_truncation_in_place_starts_a_new_chain() {
        let dir = tempfile::tempdir().unwrap();
        let (target, path) = file_target(&dir);
        let log = AuditLog::open(&target, 16, &Metrics::new().unwrap())
            .await
            .unwrap();
        for i in 0..3 {
            log.write(record(i)).await;
        }
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        log.reopen().await.unwrap();
        log.write(record(3)).await;
        log.close().await;
        assert_eq!(seqs(&path), [1]);
        assert_eq!(verify(&path), 1);
        // Without a truncation, a reopen of the same file goes on with its chain.
        let log = AuditLog::open(&target, 16, &Metrics::new().unwrap())
            .await
            .unwrap();
        log.reopen().await.unwrap();
        log.write(record(4)).await;
        log.close().await;
        assert_eq!(seqs(&path), [1, 2]);
    }

    /// A caller of `write` dropped while it waits for room in the queue (its stream reset, its
    /// connection closed) does not take its record with it.
    #[cfg(unix)]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_dropped_while_it_waits_for_room_still_records() {
        let dir = tempfile::tempdir().unwrap();
        let (log, go, reader) = log_into_unread_pipe(dir.path()).await;
        let mut rec = record(0);
        rec.path = format!("/{}", "p".repeat(2000));
        rec.task = Some("t".into());
        // More than the queue holds (4,096, besides what fills the pipe): it stays full.
        for _ in 0..4196 {
            log.write_detached(rec.clone());
        }
        assert!(log.backed_up());
        let mut dropped = record(1);
        dropped.path = "/the-dropped-write".into();
        let waited = tokio::time::timeout(Duration::from_millis(200), log.write(dropped)).await;
        assert!(waited.is_err(), "the queue had room after all");
        go.send(()).unwrap();
        log.close().await;
        let written = String::from_utf8(reader.join().unwrap()).unwrap();
        assert_eq!(written.lines().count(), 4197);
        assert_eq!(written.matches("/the-dropped-write").count(), 1);
        assert!(log.healthy());
    }

    #[tokio::test]
    async fn chain_continues_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (target, path) = file_target(&dir);
        let metrics = Metrics::new().unwrap();

        let log = AuditLog::open(&target, 16, &metrics).await.unwrap();
        for i in 0..3 {
            log.write(record(i)).await;
        }
        log.close().await;
        assert_eq!(log.records_written(), 3);
        assert!(log.healthy());

        let log = AuditLog::open(&target, 16, &metrics).await.unwrap();
        for i in 3..5 {
            log.write(record(i)).await;
        }
        log.close().await;

        assert_eq!(verify(&path), 5);
        assert_eq!(seqs(&path), [1, 2, 3, 4, 5]);
        assert!(metrics.render().contains("keyward_audit_records_total 5\n"));
    }

    // A file removed under keyward (or moved away without a reload): the records after it go
    // to a new file at the path, which starts its own chain, instead of into the removed one.
    #[tokio::test]
    async fn a_removed_file_is_noticed_and_its_path_opened_again() {
        let dir = tempfile::tempdir().unwrap();
        let (target, path) = file_target(&dir);
        let metrics = Metrics::new().unwrap();
        let log = AuditLog::open(&target, 16, &metrics).await.unwrap();
        log.write(record(0)).await;
        std::fs::remove_file(&path).unwrap();
        tokio::time::sleep(PATH_CHECK + Duration::from_millis(100)).await;
        for i in 1..4 {
            log.write(record(i)).await;
        }
        log.close().await;
        assert!(log.healthy());
        assert_eq!(verify(&path), 3);
        assert_eq!(seqs(&path), [1, 2, 3]);

        // A FIFO put at the path is not opened (it would block the writer): the log fails.
        let fifo = dir.path().join("fifo.jsonl");
        let target = AuditTarget::File(fifo.clone());
        let log = AuditLog::open(&target, 16, &metrics).await.unwrap();
        log.write(record(0)).await;
        std::fs::remove_file(&fifo).unwrap();
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap();
        assert!(made.success());
        tokio::time::sleep(PATH_CHECK + Duration::from_millis(100)).await;
        log.write(record(1)).await;
        assert!(!log.healthy(), "records went into a removed file");
        log.close().await;

        // A path that cannot be opened again fails the log: nothing is written nowhere. (At
        // start, the directory is made.)
        let sub = dir.path().join("sub");
        let target = AuditTarget::File(sub.join("audit.jsonl"));
        let log = AuditLog::open(&target, 16, &metrics).await.unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&sub).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700);
        }
        log.write(record(0)).await;
        std::fs::remove_dir_all(&sub).unwrap();
        // A file where the directory was: the path cannot be looked at (not a directory).
        std::fs::write(&sub, "").unwrap();
        tokio::time::sleep(PATH_CHECK + Duration::from_millis(100)).await;
        log.write(record(1)).await;
        assert!(!log.healthy(), "records went into a removed file");
        log.close().await;
    }

    #[tokio::test]
    async fn chain_continues_after_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let (target, path) = file_target(&dir);
        let metrics = Metrics::new().unwrap();
        let log = AuditLog::open(&target, 16, &metrics).await.unwrap();
        log.write(record(0)).await;
        log.write(record(1)).await;
        log.close().await;
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"ts\":\"2026-").unwrap();

        let log = AuditLog::open(&target, 16, &metrics).await.unwrap();
        log.write(record(2)).await;
        log.close().await;

        // The fragment stays as evidence on its own line; without it the chain is intact.
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        assert_eq!(lines[2], "{\"ts\":\"2026-");
        let without: String = [lines[0], lines[1], lines[3]]
            .map(|l| format!("{l}\n"))
            .concat();
        assert_eq!(verify_chain(io::Cursor::new(without)), Ok(3));
    }

    #[cfg(unix)]
    #[tokio::test]
    async fn new_file_is_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (target, path) = file_target(&dir);
        let log = AuditLog::open(&target, 4, &Metrics::new().unwrap())
            .await
            .unwrap();
        log.close().await;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[tokio::test]
    async fn a_second_writer_on_the_same_file_is_refused_until_the_first_closes() {
        let dir = tempfile::tempdir().unwrap();
        let (target, path) = file_target(&dir);
        let metrics = Metrics::new().unwrap();
        let first = AuditLog::open(&target, 4, &metrics).await.unwrap();
        first.write(record(0)).await;
        // The same file under another name is the same file.
        let alias = AuditTarget::File(dir.path().join("./audit.jsonl"));
        for t in [&target, &alias] {
            let err = AuditLog::open(t, 4, &metrics).await.unwrap_err();
            assert!(matches!(err, AuditError::InUse { .. }), "{err}");
            assert!(err.to_string().contains("in use"), "{err}");
        }
        // The first writer's own reopen of that file (truncated in place by logrotate's
        // `copytruncate`) is not refused by its own lock.
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(0)
            .unwrap();
        first.reopen().await.unwrap();
        first.write(record(1)).await;
        first.close().await;
        let second = AuditLog::open(&target, 4, &metrics).await.unwrap();
        second.write(record(2)).await;
        second.close().await;
        assert_eq!(seqs(&path), [1, 2]);
        assert_eq!(verify(&path), 2);
    }

    #[tokio::test]
    async fn open_reports_an_unwritable_path() {
        let dir = tempfile::tempdir().unwrap();
        // A directory keyward cannot make: under a file.
        std::fs::write(dir.path().join("a-file"), "").unwrap();
        let target = AuditTarget::File(dir.path().join("a-file/logs/audit.jsonl"));
        let err = AuditLog::open(&target, 4, &Metrics::new().unwrap())
            .await
            .unwrap_err();
        assert!(matches!(err, AuditError::Open { .. }), "{err}");
        assert!(err.to_string().contains("a-file/logs"), "{err}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn backpressure_with_capacity_one_loses_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (target, path) = file_target(&dir);
        let log = AuditLog::open(&target, 1, &Metrics::new().unwrap())
            .await
            .unwrap();
        let tasks: Vec<_> = (0..10)
            .map(|t| {
                let log = log.clone();
                tokio::spawn(async move {
                    for i in 0..100 {
                        log.write(record(t * 100 + i)).await;
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        log.close().await;
        assert!(log.healthy());
        assert_eq!(log.records_written(), 1000);
        assert_eq!(verify(&path), 1000);
        let text = std::fs::read_to_string(&path).unwrap();
        for i in 0..1000 {
            assert!(
                text.contains(&format!("\"request_id\":\"req-{i}\"")),
                "req-{i}"
            );
        }
    }

    #[tokio::test]
    async fn detached_writes_land_before_close_returns() {
        let dir = tempfile::tempdir().unwrap();
        let (target, path) = file_target(&dir);
        let log = AuditLog::open(&target, 1, &Metrics::new().unwrap())
            .await
            .unwrap();
        // Inside the runtime with a full queue: handed to tasks that wait for room.
        for i in 0..200 {
            log.write_detached(record(i));
        }
        // Outside any runtime: blocks that plain thread instead.
        let from_thread = log.clone();
        std::thread::spawn(move || {
            for i in 200..250 {
                from_thread.write_detached(record(i));
            }
        })
        .join()
        .unwrap();
        log.close().await;
        assert!(log.healthy());
        assert_eq!(verify(&path), 250);
    }

    #[tokio::test]
    async fn writes_after_close_make_the_log_unhealthy() {
        let dir = tempfile::tempdir().unwrap();
        let (target, path) = file_target(&dir);
        let log = AuditLog::open(&target, 4, &Metrics::new().unwrap())
            .await
            .unwrap();
        log.write(record(0)).await;
        log.close().await;
        log.close().await; // a second close returns at once
        assert!(log.healthy());
        log.write(record(1)).await;
        assert!(!log.healthy());
        log.write_detached(record(2));
        assert_eq!(verify(&path), 1);
    }

    #[tokio::test]
    async fn empty_ts_is_filled_by_the_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (target, path) = file_target(&dir);
        let log = AuditLog::open(&target, 4, &Metrics::new().unwrap())
            .await
            .unwrap();
        log.write(AuditRecord::default()).await;
        log.close().await;
        let text = std::fs::read_to_string(&path).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(v["ts"].as_str().unwrap().len(), 27);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_failing_sink_turns_unhealthy() {
        let target = AuditTarget::File("/dev/full".into());
        let log = AuditLog::open(&target, 4, &Metrics::new().unwrap())
            .await
            .unwrap();
        assert!(log.healthy());
        log.write(record(0)).await;
        log.close().await;
        assert!(!log.healthy());
        assert_eq!(log.records_written(), 0);
    }
}
