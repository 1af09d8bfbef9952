//! Wiring: load the policy, build the state, bind the listeners, serve, shut down.
//! `main` and the integration tests both start keyward through `start`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::audit::AuditLog;
use crate::credentials;
use crate::metrics::Metrics;
use crate::policy::{self, PolicyErrors, SecretSource};
use crate::state::{Generation, State};
use crate::tls::ca::CertAuthority;
use crate::tls::leaf::LeafCache;
use crate::upstream::OwnListeners;

/// Leaf certificates kept at most (one per intercepted host).
const LEAF_CACHE_CAPACITY: usize = 10_000;
/// Audit records that may wait for the writer before requests wait for it.
const AUDIT_QUEUE: usize = 65_536;

/// Libraries whose debug output carries what crosses the wire: `h2` prints frames (a GOAWAY's
/// debug data, which an upstream or an agent may fill with a credential), `rustls` whole
/// handshakes (the agent's server name). Kept at `info` or quieter whatever `RUST_LOG` asks.
const WIRE_LOGGERS: [&str; 3] = ["h2", "rustls", "tokio_rustls"];

/// SECURITY (I4): whether an event may be logged at all, whatever the filter lets through: not
/// one more verbose than `info` from `WIRE_LOGGERS`. `RUST_LOG` can still quieten them.
pub fn wire_safe(target: &str, level: &tracing::Level) -> bool {
    let wire = WIRE_LOGGERS.iter().any(|w| {
        target
            .strip_prefix(w)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    });
    !wire || *level <= tracing::Level::INFO
}

/// Most worker threads `KEYWARD_WORKERS` may ask for: far past any CPU count that helps, and
/// short of a number whose threads' stacks alone take the machine down.
const MAX_WORKERS: usize = 1024;

/// The number of worker threads: one per CPU this process may use. `available_parallelism`
/// honours the affinity mask and the cgroup CPU quota, so a sidecar limited to one CPU runs one
/// worker. `KEYWARD_WORKERS` overrides it; a value that is not a whole number from 1 to
/// `MAX_WORKERS` is a user error (one sentence), not silently replaced by the default.
pub fn workers() -> Result<usize, String> {
    worker_count(std::env::var("KEYWARD_WORKERS").ok().as_deref(), || {
        std::thread::available_parallelism().ok().map(|n| n.get())
    })
}

/// The tokio runtime with `workers` worker threads (see `workers`).
pub fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    tracing::info!(workers, "starting the async runtime");
    if workers == 1 {
        // One CPU: every task on the thread that runs `main`. No work-stealing queues, and no
        // cross-thread wake-ups between the accept loop and the connections it spawns.
        return tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build();
    }
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
}

/// An admin token shorter than this is guessable: it is warned about (not refused: a
/// development setup may use a word).
const ADMIN_TOKEN_MIN: usize = 16;

/// Warns when the admin token is short (never saying what it is).
pub(crate) fn warn_if_short(token: &crate::secret::Secret) {
    let len = token.expose().len();
    if len < ADMIN_TOKEN_MIN {
        tracing::warn!(
            bytes = len,
            "the admin token is short; use at least {ADMIN_TOKEN_MIN} random bytes (e.g. `openssl rand -hex 32`)"
        );
    }
}

/// Worker threads: `KEYWARD_WORKERS` when set, else the CPUs this process may use
/// (`available`: affinity mask and cgroup quota on Linux), else 1.
fn worker_count(
    var: Option<&str>,
    available: impl FnOnce() -> Option<usize>,
) -> Result<usize, String> {
    // Empty is unset (a `KEYWARD_WORKERS=${X}` template with `X` unset).
    match var.filter(|v| !v.trim().is_empty()) {
        Some(v) => match v.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(n),
            // (Echoed back escaped and cut to 24 characters: the operator's own setting.)
            _ => Err(format!(
                "KEYWARD_WORKERS must be a whole number from 1 to {MAX_WORKERS} (got `{}`); unset it to use one worker per CPU keyward may use",
                v.chars().take(24).collect::<String>().escape_default()
            )),
        },
        None => Ok(available().filter(|&n| n > 0).unwrap_or(1)),
    }
}

/// Why keyward could not start. `exit_code()` maps to SPEC §6: 1 user error, 2 internal.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Policy(PolicyErrors),
    #[error("the admin token source {0} gives no token ({1}); set it before starting")]
    AdminToken(String, credentials::SourceError),
    #[error("{0}")]
    Ca(String),
    /// `AuditError`'s sentence, which names the log and what failed.
    #[error("{0}")]
    Audit(String),
    #[error("internal error: {0}")]
    Internal(String),
    #[error("cannot listen on {addr} (`{setting}`): {source}")]
    Bind {
        setting: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl StartError {
    pub fn exit_code(&self) -> i32 {
        match self {
            StartError::Internal(_) => 2,
            _ => 1,
        }
    }
}

/// A running keyward.
pub struct Running {
    pub proxy_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub ca_path: PathBuf,
    pub state: Arc<State>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets connections finish (bounded), flushes the audit log (bounded).
    /// Fails, saying why, when audit records were lost: not written, or still queued when
    /// the log stopped taking them.
    pub async fn shutdown(self) -> Result<(), String> {
        self.state.begin_shutdown();
        // Each listener's task drains its own connections (`conn::drain`), bounded.
        let bound = self.state.settings.shutdown_timeout + crate::proxy::conn::CUT_GRACE;
        for t in self.tasks {
            let _ = tokio::time::timeout(bound, t).await;
        }
        // The operator learns that the stop was not clean, and where to look.
        let cut = self.state.cut_by_stop();
        if cut > 0 {
            tracing::warn!(
                cut,
                "the stop cut requests or WebSocket relays still in flight (the drain ran out: proxy.shutdown_timeout, or a second signal; relays are closed at once); their records say outcome `shutdown`"
            );
        }
        let audit = &self.state.audit;
        if tokio::time::timeout(AUDIT_FLUSH_LIMIT, audit.close())
            .await
            .is_err()
        {
            return Err(format!(
                "the audit log took no more records for {} s: {} not written",
                AUDIT_FLUSH_LIMIT.as_secs(),
                records(audit.unwritten())
            ));
        }
        match audit.lost() {
            0 => Ok(()),
            n => Err(format!(
                "{} could not be written (see the errors above)",
                records(n)
            )),
        }
    }
}

fn records(n: u64) -> String {
    match n {
        1 => "1 audit record".into(),
        n => format!("{n} audit records"),
    }
}

/// How long shutdown waits, after the drain, for the audit log to take its last records: a
/// sink that stopped taking them (a pipe nobody reads, a hung mount) must not keep keyward
/// from exiting until the supervisor's kill.
pub const AUDIT_FLUSH_LIMIT: Duration = Duration::from_secs(5);

pub async fn start(config: &Path) -> Result<Running, StartError> {
    let policy = policy::load(config).map_err(StartError::Policy)?;
    for w in policy.warnings() {
        tracing::warn!("{}: {w}", config.display());
    }
    #[cfg(unix)]
    open_files::raise_and_check(policy.proxy.max_connections);
    let token = credentials::read_source(&policy.admin.token)
        .await
        .map_err(|why| StartError::AdminToken(describe_source(&policy.admin.token), why))?;
    warn_if_short(&token);

    let (ca, created) = CertAuthority::load_or_create(&policy.ca.cert, &policy.ca.key)
        .map_err(|e| StartError::Ca(e.to_string()))?;
    if created {
        tracing::info!(cert = %tidy_path(&policy.ca.cert).display(), "created a new CA; agents must trust this certificate");
    }
    let leaves = LeafCache::new(Arc::new(ca), LEAF_CACHE_CAPACITY)
        .map_err(|e| StartError::Ca(e.to_string()))?;
    let metrics = Metrics::new().map_err(|e| StartError::Internal(e.to_string()))?;
    let audit = AuditLog::open(&policy.audit.path, AUDIT_QUEUE, &metrics)
        .await
        .map_err(|e| StartError::Audit(e.to_string()))?;

    let settings = policy.proxy.clone();
    let admin_listen = policy.admin.listen;
    let ca_path = policy.ca.cert.clone();
    let listeners = Arc::new(OwnListeners::default());
    let own = [Arc::new(token.clone())];
    let generation = Generation::build(config, policy, &settings, &listeners, None, &own)
        .await
        .map_err(StartError::Policy)?;
    // (Credentials that cannot be read were each logged with why by the load.)

    let proxy_listener = bind("proxy.listen", settings.listen)?;
    let admin_listener = bind("admin.listen", admin_listen)?;
    let proxy_addr = local_addr(&proxy_listener, "proxy.listen", settings.listen)?;
    let admin_addr = local_addr(&admin_listener, "admin.listen", admin_listen)?;

    let state = Arc::new(State::new(
        generation,
        config.to_path_buf(),
        leaves,
        audit,
        metrics,
        token,
        ca_path.clone(),
        listeners,
    ));
    state.listeners.set(proxy_addr, admin_addr);

    let tasks = vec![
        tokio::spawn(crate::proxy::serve(proxy_listener, state.clone())),
        tokio::spawn(crate::admin::serve(admin_listener, state.clone())),
        tokio::spawn(purge_tasks(state.clone())),
    ];
    Ok(Running {
        proxy_addr,
        admin_addr,
        ca_path,
        state,
        tasks,
    })
}

/// How many accepted-but-not-yet-taken connections a listener's queue holds (the kernel caps
/// it at `net.core.somaxconn`). The usual 128 overflowed under a burst of new connections,
/// and each overflowed client waited a full second to retry its SYN.
const LISTEN_BACKLOG: u32 = 4096;

fn bind(setting: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    let listen = || {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        // As `TcpListener::bind` does: a restart can bind while old connections linger.
        #[cfg(unix)]
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    listen().map_err(|source| StartError::Bind {
        setting,
        addr,
        source,
    })
}

fn local_addr(
    l: &TcpListener,
    setting: &'static str,
    addr: SocketAddr,
) -> Result<SocketAddr, StartError> {
    l.local_addr().map_err(|source| StartError::Bind {
        setting,
        addr,
        source,
    })
}

/// Forgets long-ended tasks once a minute.
async fn purge_tasks(state: Arc<State>) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(60)) => state.tasks.purge(SystemTime::now()),
            () = state.stopped() => return,
        }
    }
}

/// Names a secret source without its value (`env:NAME`, `file:PATH`, `exec`).
/// `path` as a person would write it (`policy/../certs/ca.pem` is `certs/ca.pem`), for
/// messages only: the file is opened by the path as given (lexically folding `..` is wrong
/// across a symlink).
pub fn tidy_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            Component::CurDir => {}
            c => out.push(c),
        }
    }
    if out.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

pub fn describe_source(source: &SecretSource) -> String {
    match source {
        SecretSource::Env(name) => format!("`env:{name}`"),
        SecretSource::File(path) => format!("`file:{}`", path.display()),
        SecretSource::Exec { .. } => "`exec`".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::{tidy_path, wire_safe, worker_count};
    use std::path::Path;

    #[test]
    fn paths_in_messages_fold_dot_dot_where_a_name_comes_before() {
        for (raw, tidy) in [
            ("policy/../certs/ca.pem", "certs/ca.pem"),
            ("./policy/./x/../../certs", "certs"),
            ("../certs/ca.pem", "../certs/ca.pem"),
            ("/etc/keyward/../ca.pem", "/etc/ca.pem"),
            ("policy/..", "."),
        ] {
            assert_eq!(tidy_path(Path::new(raw)), Path::new(tidy), "{raw}");
        }
    }

    #[test]
    fn the_wire_libraries_never_log_below_info() {
        use tracing::Level;
        for target in [
            "h2",
            "h2::codec::framed_read",
            "rustls::server::hs",
            "tokio_rustls",
        ] {
            for level in [Level::TRACE, Level::DEBUG] {
                assert!(!wire_safe(target, &level), "{target} {level}");
            }
            for level in [Level::INFO, Level::WARN, Level::ERROR] {
                assert!(wire_safe(target, &level), "{target} {level}");
            }
        }
        // keyward's own, and names that only start alike, follow RUST_LOG alone.
        for target in [
            "keyward::proxy::conn",
            "h2c",
            "rustls_native_certs",
            "hyper",
        ] {
            assert!(wire_safe(target, &Level::TRACE), "{target}");
        }
    }

    #[test]
    fn workers_follow_the_cpus_the_process_may_use_unless_overridden() {
        // No override: whatever `available_parallelism` reports (affinity, cgroup quota).
        assert_eq!(worker_count(None, || Some(1)), Ok(1));
        assert_eq!(worker_count(None, || Some(6)), Ok(6));
        assert_eq!(worker_count(None, || None), Ok(1));
        // KEYWARD_WORKERS wins when it is a whole number from 1 to 1024.
        assert_eq!(worker_count(Some("3"), || Some(1)), Ok(3));
        assert_eq!(worker_count(Some(" 2 "), || Some(8)), Ok(2));
        assert_eq!(worker_count(Some("1024"), || Some(8)), Ok(1024));
        // Empty is unset.
        assert_eq!(worker_count(Some(""), || Some(4)), Ok(4));
        assert_eq!(worker_count(Some("  "), || Some(4)), Ok(4));
        // Anything else is said, not replaced by the default (or obeyed: 999999 threads).
        for bad in ["0", "-1", "many", "1025", "999999", "2.5"] {
            let err = worker_count(Some(bad), || Some(4)).unwrap_err();
            assert!(err.starts_with("KEYWARD_WORKERS must be"), "{bad:?}: {err}");
            assert!(err.contains(&format!("`{bad}`")), "{bad:?}: {err}");
        }
    }
}

/// The open-files limit. Every agent connection takes a descriptor, most an upstream one too,
/// and a soft limit of 1024 (a common default) is far below `max_connections`' 4096: past it
/// `accept` fails and agents wait in the backlog. Like Go's runtime, `serve` raises the soft
/// limit to the hard one, and says so when even that is too low.
#[cfg(unix)]
mod open_files {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

    /// Linux refuses a limit above `fs.nr_open` (2^20 by default), "unlimited" included.
    const CEILING: u64 = 1 << 20;

    pub fn raise_and_check(max_connections: usize) {
        let before = getrlimit(Resource::Nofile);
        let soft = before.current.unwrap_or(CEILING);
        let target = before.maximum.unwrap_or(CEILING).min(CEILING);
        if soft < target {
            let raised = Rlimit {
                current: Some(target),
                maximum: before.maximum,
            };
            if setrlimit(Resource::Nofile, raised).is_ok() {
                tracing::info!(from = soft, to = target, "raised the open-files limit");
            }
        }
        let now = getrlimit(Resource::Nofile).current.unwrap_or(CEILING);
        let wanted = crate::places::descriptors_needed(max_connections);
        if now < wanted {
            // (`proxy::serve` takes only as many: `places::fitting`.)
            let places = crate::places::fitting(max_connections, Some(now));
            tracing::warn!(
                limit = now,
                wanted,
                places,
                "the open-files limit is below what proxy.max_connections needs (an agent and an upstream descriptor per connection), so the proxy takes only this many connections at once, and silent clients still give their places up to agents; raise the limit (ulimit -n, LimitNOFILE=, the container's nofile) or lower max_connections"
            );
        }
    }
}
