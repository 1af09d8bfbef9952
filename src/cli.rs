//! The command line (SPEC §6): parses arguments and dispatches. No business logic here.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Parser, Subcommand};
use http::Method;

use crate::admin::client;
use crate::decide::{self, ConnectDecision, RequestFacts};
use crate::policy::{self, CompiledPolicy, Injection, Scheme};
use crate::proxy::identify::parse_authority;
use crate::secret::Secret;
use crate::tasks::{MintSpec, TaskStore};

/// `eprintln!` that never panics: with stderr closed (a supervisor gone, a reader that hung
/// up) the message is lost, but the exit code still says what happened.
macro_rules! err {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `println!` for command output. A reader that stopped reading (`keyward explain … | head
/// -1`) is not an error: the rest of the output is dropped and the command finishes, so its
/// exit code still tells its verdict (`audit verify`); `println!` would panic (exit 101).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        use std::sync::atomic::Ordering;
        if !READER_GONE.load(Ordering::Relaxed) {
            if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    err!("keyward: cannot write the output: {e}");
                    std::process::exit(2);
                }
                READER_GONE.store(true, Ordering::Relaxed);
            }
        }
    }};
}

/// Set once stdout's reader has gone (see `out!`).
static READER_GONE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[derive(Parser)]
#[command(
    name = "keyward",
    version,
    about = "A forward proxy that holds API credentials for AI agents"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the proxy and the admin API (logs to stderr; level from RUST_LOG, e.g.
    /// `RUST_LOG=keyward=debug`). SIGHUP reloads the policy and reopens the audit file;
    /// SIGTERM/SIGINT drain requests in flight and exit 0 (2 if audit records were lost).
    /// KEYWARD_WORKERS sets the number of
    /// worker threads (default: the CPUs keyward may use).
    Serve {
        /// The policy file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a policy file; print every error as file:line:column: key.path: message.
    Check {
        /// The policy file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Show what keyward would decide for a request, without sending anything.
    Explain {
        /// The policy file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// The agent the task would be minted for.
        #[arg(long)]
        agent: String,
        /// Capabilities of the intent, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        intent: Vec<String>,
        /// Path-parameter constraint K=V (applies to every capability with that parameter;
        /// repeat it for more allowed values).
        #[arg(long = "where", value_name = "K=V")]
        constraints: Vec<String>,
        /// The request's method (GET, POST, ...), or CONNECT for a tunnel.
        method: String,
        /// The request's absolute URL (https://host/path?query), or host:port for CONNECT.
        url: String,
    },
    /// Mint, list and revoke tasks through the admin API.
    Task {
        #[command(subcommand)]
        command: TaskCommand,
    },
    /// Manage keyward's certificate authority.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Check audit logs.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
pub enum AuditCommand {
    /// Verify each file's hash chain (every line a record, seq 1, 2, 3, …, every hash linking
    /// to the one before); print its record count and last hash, or the first broken line.
    /// Compare the last hash with the `audit chain end` keyward logged: a chain alone does
    /// not show records cut off its end, nor one rewritten whole.
    Verify {
        /// Each file is a piece from the middle of a log (a collector's chunk, the audit
        /// lines of a merged stream): its first record is taken on trust, the rest checked.
        #[arg(long)]
        from_middle: bool,
        /// Audit files (JSON lines), each checked on its own.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum TaskCommand {
    /// Mint a task and print the proxy URL to export. The admin token comes from
    /// KEYWARD_ADMIN_TOKEN.
    Mint {
        /// The agent the task is for (one of the policy's agents).
        #[arg(long)]
        agent: String,
        /// Capabilities of the intent, comma-separated (each granted to the agent).
        #[arg(long, value_delimiter = ',', required = true)]
        intent: Vec<String>,
        /// Path-parameter constraint K=V for every capability with that parameter; repeat it
        /// for more allowed values (--where repo=web --where repo=api).
        #[arg(long = "where", value_name = "K=V")]
        constraints: Vec<String>,
        /// Lifetime (30s, 10m, 2h; default 30m, at most the agent's max_ttl).
        #[arg(long)]
        ttl: Option<String>,
        /// Most requests the task may make (default: no count, only its ttl).
        #[arg(long)]
        max_requests: Option<u64>,
        /// Task id (generated when absent).
        #[arg(long)]
        task: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List tasks (never tokens). The admin token comes from KEYWARD_ADMIN_TOKEN.
    List {
        /// Only this agent's tasks.
        #[arg(long)]
        agent: Option<String>,
        /// Only tasks in this state.
        #[arg(long, value_parser = ["active", "expired", "revoked"])]
        status: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke a task at once. The admin token comes from KEYWARD_ADMIN_TOKEN.
    Revoke {
        /// The task's id.
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(clap::Args)]
pub struct AdminArgs {
    /// Admin API base URL.
    #[arg(long, default_value = "http://127.0.0.1:8481")]
    admin: String,
    /// Seconds to wait for the admin API's answer.
    #[arg(long, value_name = "SECONDS", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    timeout: u64,
}

impl AdminArgs {
    fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout)
    }
}

#[derive(Subcommand)]
pub enum CaCommand {
    /// Create the CA (ca.pem and ca-key.pem) in DIR; refuses to overwrite.
    Init {
        /// The directory (created if missing).
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
    },
}

/// A failure of a command: its message (one sentence) and exit code.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub code: i32,
}

impl Failure {
    fn user(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: 1,
        }
    }

    /// A user error whose sentences were printed already (`check`'s one line per error, which
    /// SPEC §6 makes the whole of its stderr): nothing more to say.
    fn reported() -> Failure {
        Failure::user(String::new())
    }
}

/// A command-line mistake as one sentence (SPEC §6), from clap's several lines: what is wrong,
/// then the usage line.
pub fn usage_mistake(e: &clap::Error) -> String {
    let text = e.to_string();
    let usage = text.lines().find_map(|l| l.trim().strip_prefix("Usage: "));
    let mut sentence =
        if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            // clap's text is the whole help of the command its usage line names.
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let path = usage.unwrap_or_default().split_whitespace().skip(1);
            for name in path.take_while(|w| !w.starts_with(['<', '[', '-'])) {
                match cmd.find_subcommand(name) {
                    Some(sub) => cmd = sub.clone(),
                    None => break,
                }
            }
            let names: Vec<&str> = cmd
                .get_subcommands()
                .map(|c| c.get_name())
                .filter(|n| *n != "help")
                .collect();
            format!("a command is required, one of: {}", names.join(", "))
        } else {
            let mut parts: Vec<String> = Vec::new();
            for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
                if line.starts_with("Usage: ") || line.starts_with("For more information") {
                    continue;
                }
                match (line.strip_prefix("error: "), parts.last_mut()) {
                    // A tip is a sentence of its own; an argument listed under the error
                    // continues it.
                    (Some(said), _) => parts.push(said.to_string()),
                    (None, Some(last)) if !line.starts_with("tip:") => {
                        last.push(' ');
                        last.push_str(line);
                    }
                    (None, _) => parts.push(line.to_string()),
                }
            }
            parts.join("; ")
        };
    match usage {
        Some(u) => sentence.push_str(&format!(" (usage: {u})")),
        None => sentence.push_str(" (see keyward --help)"),
    }
    sentence
}

pub async fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Serve { config } => serve(&config).await,
        Command::Check { config } => check(&config),
        Command::Explain {
            config,
            agent,
            intent,
            constraints,
            method,
            url,
        } => explain(
            &config,
            agent,
            capabilities(intent),
            &constraints,
            &method,
            &url,
        ),
        Command::Task { command } => task(command).await,
        Command::Audit {
            command: AuditCommand::Verify { files, from_middle },
        } => audit_verify(&files, from_middle),
        Command::Ca {
            command: CaCommand::Init { dir },
        } => {
            let cert = dir.join("ca.pem");
            let key = dir.join("ca-key.pem");
            crate::tls::ca::CertAuthority::create(&cert, &key)
                .map_err(|e| Failure::user(e.to_string()))?;
            out!("created {} and {}", cert.display(), key.display());
            out!(
                "trust {} in your agents (SSL_CERT_FILE, NODE_EXTRA_CA_CERTS, curl --cacert)",
                cert.display()
            );
            Ok(())
        }
    }
}

/// `keyward audit verify`: exit 0 when every file verifies, else 1 (every file is checked).
fn audit_verify(files: &[PathBuf], from_middle: bool) -> Result<(), Failure> {
    let mut broken = 0;
    for path in files {
        let verified = std::fs::File::open(path)
            .map_err(|e| format!("{}: cannot be read: {e}", path.display()))
            .and_then(|f| match f.metadata() {
                Ok(m) if m.is_dir() => Err(format!(
                    "{}: is a directory (name the audit files in it)",
                    path.display()
                )),
                _ => Ok(f),
            })
            .and_then(|f| {
                let reader = std::io::BufReader::new(f);
                let checked = match from_middle {
                    true => crate::audit::verify_chain_from_middle(reader),
                    false => crate::audit::verify_whole(reader),
                };
                checked.map_err(|e| format!("{}:{}: {}", path.display(), e.line, e.problem))
            });
        match &verified {
            Ok(v) if from_middle => out!(
                "{}: ok, {} records from seq {} (the first taken on trust), last hash {}",
                path.display(),
                v.records,
                v.first_seq,
                v.last.as_deref().unwrap_or("-")
            ),
            Ok(v) => out!(
                "{}: ok, {} records, last hash {}",
                path.display(),
                v.records,
                v.last.as_deref().unwrap_or("-")
            ),
            Err(message) => {
                broken += 1;
                out!("{message}");
            }
        }
        if let Ok(v) = &verified {
            if !v.not_records.is_empty() {
                let at: Vec<String> = v.not_records.iter().map(ToString::to_string).collect();
                out!(
                    "{}: note: line(s) {} are not records (a write torn by a crash or a full disk); the chain holds across them",
                    path.display(),
                    at.join(", ")
                );
            }
        }
    }
    match broken {
        0 => Ok(()),
        n => Err(Failure::user(format!(
            "{n} of {} audit files do not verify",
            files.len()
        ))),
    }
}

async fn serve(config: &Path) -> Result<(), Failure> {
    // Handlers first: a supervisor may signal as soon as the listening line appears.
    let mut signals = Signals::install();
    // A stop asked for while starting (a credential `exec` may take its 30 s) is honoured at
    // once: nothing is listening or recorded yet.
    let started = tokio::select! {
        started = crate::app::start(config) => started,
        () = signals.stopped() => {
            tracing::info!("stopped while starting");
            return Ok(());
        }
    };
    let running = started.map_err(|e| Failure {
        code: e.exit_code(),
        message: e.to_string(),
    })?;
    err!(
        "keyward listening proxy={} admin={} ca={}",
        running.proxy_addr,
        running.admin_addr,
        crate::app::tidy_path(&running.ca_path).display()
    );
    signals.wait(&running).await;
    tracing::info!("shutting down");
    let state = running.state.clone();
    // A second SIGTERM/SIGINT (an operator's second Ctrl-C) ends the drain at once: what is
    // in flight is cut and recorded, the audit log flushed, as when the drain runs out.
    let second = async {
        signals.stopped().await;
        tracing::warn!("second stop signal: cutting the drain short");
        state.cut_drain();
        std::future::pending::<()>().await;
    };
    tokio::select! {
        stopped = running.shutdown() => stopped.map_err(|message| Failure { message, code: 2 }),
        () = second => Ok(()),
    }
}

/// SIGTERM/SIGINT stop keyward; SIGHUP reloads the policy.
#[cfg(unix)]
struct Signals(
    Option<(
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
        tokio::signal::unix::Signal,
    )>,
);

#[cfg(unix)]
impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::hangup()),
        ) {
            (Ok(term), Ok(int), Ok(hup)) => Signals(Some((term, int, hup))),
            _ => Signals(None),
        }
    }

    /// Until SIGTERM or SIGINT. A SIGHUP meanwhile stays pending for `wait`, which reloads
    /// once start-up is done (logrotate's `postrotate` may send one at any time).
    async fn stopped(&mut self) {
        let Some((term, int, _)) = &mut self.0 else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    }

    async fn wait(&mut self, running: &crate::app::Running) {
        let Some((term, int, hup)) = &mut self.0 else {
            let _ = tokio::signal::ctrl_c().await;
            return;
        };
        loop {
            tokio::select! {
                _ = term.recv() => return,
                _ = int.recv() => return,
                _ = hup.recv() => {
                    // A stop is not held up by a reload (a credential `exec` may take 30 s):
                    // the reload is dropped unfinished, which leaves the old policy serving.
                    tokio::select! {
                        reloaded = running.state.reload() => {
                            // A failure is logged by `reload` itself.
                            if let Ok(r) = reloaded {
                                tracing::info!(policy_version = %r.version, "reloaded on SIGHUP");
                            }
                        }
                        _ = term.recv() => return,
                        _ = int.recv() => return,
                    }
                }
            }
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn install() -> Signals {
        Signals
    }

    async fn stopped(&mut self) {
        let _ = tokio::signal::ctrl_c().await;
    }

    async fn wait(&mut self, _running: &crate::app::Running) {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Tasks asked for at once by `task list`.
const LIST_PAGE: usize = 500;

fn check(config: &Path) -> Result<(), Failure> {
    match policy::load(config) {
        Ok(p) => {
            // The CA as `serve` would load it, so a broken one fails here and not at start.
            match crate::tls::CertAuthority::check_files(&p.ca.cert, &p.ca.key) {
                Ok(None) => {}
                Ok(Some(note)) => err!("{}: note: {note}", config.display()),
                Err(e) => {
                    err!("{}: ca: {e}", config.display());
                    return Err(Failure::reported());
                }
            }
            out!(
                "{}: ok ({} services, {} capabilities, {} agents; policy_version {})",
                config.display(),
                p.services.len(),
                p.capabilities.len(),
                p.agents.len(),
                p.version
            );
            for w in p.warnings() {
                err!("{}: warning: {w}", config.display());
            }
            Ok(())
        }
        Err(errors) => {
            for e in &errors.0 {
                err!("{e}");
            }
            Err(Failure::reported())
        }
    }
}

/// `--intent a, b` names `a` and `b` (a shell-quoted list often has blanks after its commas);
/// empty items (`a, b,`) are dropped.
fn capabilities(intent: Vec<String>) -> Vec<String> {
    intent
        .into_iter()
        .map(|c| c.trim().to_string())
        .filter(|c| !c.is_empty())
        .collect()
}

/// Parses `k=v` constraints into (k, [v]) pairs, merging repeated keys.
fn parse_where(items: &[String]) -> Result<Vec<(String, Vec<String>)>, Failure> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for item in items {
        let (k, v) = item
            .split_once('=')
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| Failure::user(format!("--where `{item}` must be KEY=VALUE")))?;
        match out.iter_mut().find(|(key, _)| key == k) {
            Some((_, vals)) => vals.push(v.to_string()),
            None => out.push((k.to_string(), vec![v.to_string()])),
        }
    }
    Ok(out)
}

/// `explain … CONNECT host:port`: the tunnel's own decision, as `serve` records it (the
/// requests inside an intercepted tunnel are each decided like a plain one).
/// A target `serve` refuses before any decision (an odd authority, a fragment, ...): a
/// decision to print, not a usage error.
fn print_refused_target(e: &crate::proxy::identify::TargetError) -> Result<(), Failure> {
    out!(
        "decision:   deny\nreason:     {} ({})",
        e.reason.as_str(),
        e.code
    );
    Ok(())
}

fn explain_connect(
    compiled: &CompiledPolicy,
    task: &crate::tasks::Task,
    target: &str,
    now: SystemTime,
) -> Result<(), Failure> {
    // `https://host:port` is taken for `host:port`, as a client given that URL would CONNECT
    // (one given an `http://` URL sends no CONNECT: explain that request instead).
    if target.starts_with("http://") {
        return Err(Failure::user(
            "an http:// URL is not reached through CONNECT; explain the request itself (GET http://…)",
        ));
    }
    let authority = target
        .strip_prefix("https://")
        .unwrap_or(target)
        .trim_end_matches('/');
    let (host, port) = match parse_authority(authority, 443) {
        Ok(hp) => hp,
        Err(e) => return print_refused_target(&e),
    };
    match decide::decide_connect(compiled, task, &host, port, now) {
        Ok(ConnectDecision::Intercept { service }) => {
            let name = service.map_or("", |s| compiled.service_at(s).name.as_str());
            out!("decision:   allow\nreason:     allowed");
            out!("connect:    intercept {host}:{port} (service {name}); each request inside is decided on its own");
        }
        Ok(ConnectDecision::Tunnel) => {
            out!("decision:   tunnel\nreason:     passthrough");
            out!("connect:    tunnel {host}:{port} (passthrough: not inspected, no credential)");
        }
        Err(d) => print_denial(compiled, &d),
    }
    Ok(())
}

fn explain(
    config: &Path,
    agent: String,
    intent: Vec<String>,
    constraints: &[String],
    method: &str,
    url: &str,
) -> Result<(), Failure> {
    let policy = policy::load(config).map_err(|e| Failure::user(e.to_string()))?;
    let compiled = CompiledPolicy::compile(policy);
    let constraints = parse_where(constraints)?;
    let grants = crate::tasks::grants_with_where(&compiled, intent, &constraints)
        .map_err(|e| Failure::user(e.to_string()))?;
    let store = TaskStore::new();
    let now = SystemTime::now();
    let (task, _token) = store
        .mint(
            &compiled,
            MintSpec {
                agent,
                task: Some("explain".into()),
                intent: grants,
                ttl: None,
                max_requests: None,
            },
            now,
        )
        .map_err(|e| Failure::user(e.to_string()))?;
    if method.eq_ignore_ascii_case("CONNECT") {
        return explain_connect(&compiled, &task, url, now);
    }
    let uri: http::Uri = url
        .parse()
        .map_err(|_| Failure::user(format!("`{url}` is not a URL")))?;
    let scheme = match uri.scheme_str() {
        Some("https") => Scheme::Https,
        Some("http") => Scheme::Http,
        _ => return Err(Failure::user("the URL must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .ok_or_else(|| Failure::user("the URL has no host"))?;
    // (As `serve` refuses such an authority: a decision, not a usage error.)
    let (host, port) = match parse_authority(authority.as_str(), scheme.default_port()) {
        Ok(hp) => hp,
        Err(e) => return print_refused_target(&e),
    };
    let method = Method::from_bytes(method.as_bytes())
        .map_err(|_| Failure::user(format!("`{method}` is not an HTTP method")))?;
    // An https:// URL is reached through CONNECT: what keyward decides there comes first, as
    // the agent would meet it.
    if scheme == Scheme::Https {
        match decide::decide_connect(&compiled, &task, &host, port, now) {
            Ok(ConnectDecision::Intercept { service }) => match service {
                Some(s) => out!(
                    "connect:    intercept {host}:{port} (service {})",
                    compiled.service_at(s).name
                ),
                None => out!("connect:    intercept {host}:{port}"),
            },
            Ok(ConnectDecision::Tunnel) => {
                out!(
                    "connect:    tunnel {host}:{port} (passthrough: not inspected, no credential)"
                );
                out!("decision:   tunnel\nreason:     passthrough");
                return Ok(());
            }
            Err(d) => {
                out!("connect:    deny {host}:{port}");
                print_denial(&compiled, &d);
                return Ok(());
            }
        }
    }
    // The request's own checks, as `serve` makes them (a fragment, `_method` in the query,
    // the path's spelling), then the decision.
    let (mut parts, ()) = http::Request::builder()
        .method(method.clone())
        .uri(uri.clone())
        .body(())
        .map_err(|_| Failure::user(format!("`{url}` is not a URL")))?
        .into_parts();
    if url.contains('#') {
        parts
            .extensions
            .insert(crate::proxy::fragment::FragmentInTarget);
    }
    let path = match crate::proxy::identify::absolute_target(&parts) {
        Ok(target) => target.path,
        Err(e) => return print_refused_target(&e),
    };
    let facts = RequestFacts {
        scheme,
        host: &host,
        port,
        method: &method,
        path: &path,
    };
    match decide::decide(&compiled, &task, &facts, now) {
        Ok(permit) => {
            let cap = compiled.capability_at(permit.capability());
            let service = compiled.service_at(permit.service());
            // SECURITY (as in `serve`): `API_KEY` or `api.key` beside the injected `api_key`.
            if let Some(Injection::Query { param, .. }) = &service.inject {
                if uri
                    .query()
                    .is_some_and(|q| crate::proxy::identify::query_lookalike(q, param))
                {
                    out!("decision:   deny\nreason:     ambiguous_request (query_lookalike)");
                    return Ok(());
                }
            }
            out!("decision:   allow\nreason:     allowed");
            out!("service:    {}", service.name);
            out!("capability: {} (risk {})", cap.name, cap.risk.as_str());
            let route = cap
                .route_text
                .get(permit.route())
                .map_or("", String::as_str);
            out!("route:      {route}");
            match &service.inject {
                Some(inj) => {
                    let (idx, place) = match inj {
                        Injection::Header {
                            name, credential, ..
                        } => (*credential, format!("header {name}")),
                        Injection::Query { param, credential } => {
                            (*credential, format!("query parameter {param}"))
                        }
                        Injection::Basic { credential, .. } => {
                            (*credential, "basic auth".to_string())
                        }
                    };
                    let name = &compiled.policy().credentials[idx].name;
                    out!("credential: {name} (injected as {place})");
                }
                None => out!("credential: none"),
            }
        }
        Err(d) => {
            print_denial(&compiled, &d);
            for broken in broken_constraints(&compiled, &task, &d, &path) {
                out!("constraint: {broken}");
            }
        }
    }
    Ok(())
}

/// A 2xx answer without what keyward's admin API answers.
fn not_keyward(admin: &str, what: &str) -> Failure {
    Failure::user(format!(
        "{admin} answered without {what}; is it keyward's admin API?"
    ))
}

fn print_denial(policy: &CompiledPolicy, d: &decide::Denial) {
    out!("decision:   deny\nreason:     {}", d.reason.as_str());
    if let Some(c) = d.capability {
        out!("closest:    {}", policy.capability_at(c).name);
    }
    if let Some(h) = d.hint {
        let cap = policy.capability_at(h);
        match cap.risk.needs_approval() {
            true => out!(
                "would allow: {} ({})",
                cap.name,
                crate::proxy::respond::approval_note(cap.risk.as_str())
            ),
            false => out!("would allow: {}", cap.name),
        }
    }
}

/// For a `constraint_mismatch`: which of the task's constraints the path's parameters break.
fn broken_constraints(
    policy: &CompiledPolicy,
    task: &crate::tasks::Task,
    d: &decide::Denial,
    path: &crate::matcher::CanonPath,
) -> Vec<String> {
    let decide::Denial {
        reason: crate::reason::Reason::ConstraintMismatch,
        capability: Some(c),
        route: Some(r),
        ..
    } = d
    else {
        return Vec::new();
    };
    let cap = policy.capability_at(*c);
    let (Some(route), Some(grant)) = (cap.routes.get(*r), task.grant(&cap.name)) else {
        return Vec::new();
    };
    let mut router = crate::matcher::Router::new();
    router.insert(route, ());
    let mut found = Vec::new();
    router.find(path, &mut found);
    let Some(m) = found.first() else {
        return Vec::new();
    };
    grant
        .constraints
        .iter()
        .filter_map(|(name, allowed)| {
            let value = route
                .param_names()
                .position(|p| p == name)
                .and_then(|k| m.captures.value(k, path));
            match value {
                Some(v) if allowed.iter().any(|a| a == v) => None,
                Some(v) => Some(format!(
                    "{name} is `{v}`; the task allows {}",
                    allowed.join(", ")
                )),
                None => Some(format!(
                    "route `{}` has no `{name}` to hold to the task's constraint",
                    cap.route_text.get(*r).map_or("", String::as_str)
                )),
            }
        })
        .collect()
}

async fn task(command: TaskCommand) -> Result<(), Failure> {
    // Trimmed like `serve` trims it, so `$(cat token-file)` and `echo`'d secrets work alike.
    let token = std::env::var("KEYWARD_ADMIN_TOKEN")
        .ok()
        .map(|t| t.trim_end_matches(['\n', '\r']).to_string())
        .filter(|t| !t.is_empty())
        .map(Secret::new)
        .ok_or_else(|| Failure::user("set KEYWARD_ADMIN_TOKEN to the admin token"))?;
    let fail = |e: client::ClientError| Failure::user(e.to_string());
    match command {
        TaskCommand::Mint {
            agent,
            intent,
            constraints,
            ttl,
            max_requests,
            task,
            admin,
        } => {
            let wh: serde_json::Map<String, serde_json::Value> = parse_where(&constraints)?
                .into_iter()
                .map(|(k, v)| (k, serde_json::json!(v)))
                .collect();
            let intent = capabilities(intent);
            let mut body = serde_json::json!({ "agent": agent, "intent": intent });
            if !wh.is_empty() {
                body["where"] = serde_json::Value::Object(wh);
            }
            if let Some(t) = ttl {
                body["ttl"] = t.into();
            }
            if let Some(n) = max_requests {
                body["max_requests"] = n.into();
            }
            if let Some(t) = task {
                body["task"] = t.into();
            }
            let out = client::call(
                &admin.admin,
                admin.timeout(),
                &token,
                Method::POST,
                "/v1/tasks",
                Some(body),
            )
            .await
            .map_err(fail)?;
            // SECURITY: an `export` of empty proxy variables (any server's 200 without a task)
            // would send the agent around keyward; only a whole answer is printed.
            let minted = ["proxy_url", "task", "expires_at"].map(|k| out[k].as_str());
            let [Some(url), Some(task), Some(expires)] = minted else {
                return Err(not_keyward(&admin.admin, "a task and its proxy URL"));
            };
            if url.is_empty() || out["token"].as_str().is_none() {
                return Err(not_keyward(&admin.admin, "a task and its proxy URL"));
            }
            out!("# task {task} expires {expires}");
            // Both cases: curl reads only the lowercase `http_proxy`, other clients the upper.
            out!("export HTTPS_PROXY={url} HTTP_PROXY={url} https_proxy={url} http_proxy={url}");
            Ok(())
        }
        TaskCommand::List {
            agent,
            status,
            admin,
        } => {
            if let Some(a) = agent.as_deref() {
                crate::policy::check_name(a).map_err(|why| {
                    Failure::user(format!("--agent {a:?} is not an agent name: {why}"))
                })?;
            }
            let mut filters: Vec<String> = [("agent", agent), ("status", status)]
                .into_iter()
                .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
                .collect();
            // Page by page: a whole list of tasks with many constraints runs to megabytes,
            // which keyward would hold while answering. (Task ids need no escaping.)
            filters.push(format!("limit={LIST_PAGE}"));
            let mut tasks: Vec<serde_json::Value> = Vec::new();
            let mut after: Option<String> = None;
            loop {
                let page_query = match &after {
                    Some(id) => format!("{}&after={id}", filters.join("&")),
                    None => filters.join("&"),
                };
                let out = client::call(
                    &admin.admin,
                    admin.timeout(),
                    &token,
                    Method::GET,
                    &format!("/v1/tasks?{page_query}"),
                    None,
                )
                .await
                .map_err(fail)?;
                let Some(page) = out["tasks"].as_array() else {
                    return Err(not_keyward(&admin.admin, "a task list"));
                };
                tasks.extend(page.iter().cloned());
                match out["next"].as_str() {
                    Some(next) if after.as_deref() != Some(next) => after = Some(next.to_string()),
                    _ => break,
                }
            }
            let empty = Vec::new();
            // Columns as wide as their widest entry (task ids and agents vary a lot).
            let rows: Vec<[String; 6]> = tasks
                .iter()
                .map(|t| {
                    let intent: Vec<String> = t["intent"]
                        .as_array()
                        .unwrap_or(&empty)
                        .iter()
                        .map(|i| match i.as_str() {
                            Some(cap) => cap.to_string(),
                            // `cap{owner=acme,repo=web|api}`: the constraints it was minted with.
                            None => {
                                let wh: Vec<String> = i["where"]
                                    .as_object()
                                    .map(|m| {
                                        m.iter()
                                            .map(|(k, v)| {
                                                let vals: Vec<&str> = v
                                                    .as_array()
                                                    .unwrap_or(&empty)
                                                    .iter()
                                                    .filter_map(|x| x.as_str())
                                                    .collect();
                                                format!("{k}={}", vals.join("|"))
                                            })
                                            .collect()
                                    })
                                    .unwrap_or_default();
                                format!(
                                    "{}{{{}}}",
                                    i["capability"].as_str().unwrap_or_default(),
                                    wh.join(",")
                                )
                            }
                        })
                        .collect();
                    let used = match t["max_requests"].as_u64() {
                        Some(max) => format!("{}/{max}", t["requests_used"]),
                        None => t["requests_used"].to_string(),
                    };
                    [
                        t["task"].as_str().unwrap_or_default().to_string(),
                        t["agent"].as_str().unwrap_or_default().to_string(),
                        t["status"].as_str().unwrap_or_default().to_string(),
                        t["expires_at"].as_str().unwrap_or_default().to_string(),
                        used,
                        intent.join(","),
                    ]
                })
                .collect();
            let header = ["TASK", "AGENT", "STATUS", "EXPIRES", "USED", "INTENT"].map(String::from);
            let mut width = [0usize; 5];
            for row in std::iter::once(&header).chain(&rows) {
                for (w, cell) in width.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            for [task, agent, status, expires, used, intent] in
                std::iter::once(&header).chain(&rows)
            {
                out!(
                    "{task:<w0$}  {agent:<w1$}  {status:<w2$}  {expires:<w3$}  {used:>w4$}  {intent}",
                    w0 = width[0],
                    w1 = width[1],
                    w2 = width[2],
                    w3 = width[3],
                    w4 = width[4],
                );
            }
            Ok(())
        }
        TaskCommand::Revoke { id, admin } => {
            // The id becomes a path segment: `main?x=1` or `../x` must not address another.
            if !crate::tasks::valid_task_id(&id) {
                return Err(Failure::user(format!(
                    "`{id}` is not a task id (1-128 characters of A-Z a-z 0-9 . _ -, and not `.` or `..`)"
                )));
            }
            let out = client::call(
                &admin.admin,
                admin.timeout(),
                &token,
                Method::DELETE,
                &format!("/v1/tasks/{id}"),
                None,
            )
            .await
            .map_err(fail)?;
            // Only keyward's answer says it was revoked: any other server's 200 must not.
            if out["task"].as_str() != Some(id.as_str()) || out["status"].as_str().is_none() {
                return Err(not_keyward(&admin.admin, "the revoked task"));
            }
            out!("revoked {id}");
            Ok(())
        }
    }
}
