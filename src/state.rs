//! `State`: everything a request or an admin call needs, shared through one `Arc`.
//!
//! A policy *generation* (compiled policy, its credentials and its upstream clients) is swapped
//! atomically on reload; requests in flight keep the generation they started with. Tasks, the
//! leaf cache, the audit log and metrics outlive reloads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::audit::AuditLog;
use crate::credentials::CredentialStore;
use crate::metrics::Metrics;
use crate::policy::{
    self, AdminSettings, AuditSettings, CaSettings, CompiledPolicy, Policy, PolicyErrors,
    ProxySettings,
};
use crate::secret::Secret;
use crate::tasks::{self, TaskStore};
use crate::tls::leaf::LeafCache;
use crate::upstream::{OwnListeners, Upstreams};

/// One loaded policy with what was built from it.
pub struct Generation {
    pub policy: CompiledPolicy,
    pub credentials: CredentialStore,
    pub upstreams: Upstreams,
}

impl Generation {
    /// Compiles a validated policy and builds its credentials and clients (`previous`: the
    /// generation a reload replaces; `own_secrets`: keyward's, looked for like credentials).
    pub async fn build(
        source: &Path,
        policy: policy::Policy,
        settings: &ProxySettings,
        own: &Arc<OwnListeners>,
        previous: Option<&Generation>,
        own_secrets: &[Arc<Secret>],
    ) -> Result<Generation, PolicyErrors> {
        let file = source.display().to_string();
        // Compiling a large policy (and reading its CA files) takes a while: off the async
        // workers, which keep serving meanwhile (with one worker, a sidecar's, nothing would).
        let (timeout, own) = (settings.connect_timeout, Arc::clone(own));
        let built = tokio::task::spawn_blocking(move || {
            let policy = CompiledPolicy::compile(policy);
            let upstreams = Upstreams::build(&policy, timeout, &own);
            (policy, upstreams)
        })
        .await;
        let Ok((policy, upstreams)) = built else {
            return Err(PolicyErrors::whole_file(
                &file,
                "compiling the policy failed",
            ));
        };
        let upstreams = upstreams.map_err(|e| PolicyErrors::whole_file(&file, e.to_string()))?;
        let credentials =
            CredentialStore::load(&policy, previous.map(|g| &g.credentials), own_secrets).await;
        credentials.spawn_refreshers();
        Ok(Generation {
            policy,
            credentials,
            upstreams,
        })
    }
}

pub struct State {
    generation: ArcSwap<Generation>,
    /// Bumped after each reload swapped a generation in (`until_disallowed`).
    swapped: tokio::sync::watch::Sender<u64>,
    pub config_path: PathBuf,
    /// Listener settings of the policy the process started with (listeners are not rebound).
    pub settings: ProxySettings,
    /// The rest of what only a restart applies, as the process started with it.
    restart_only: RestartOnly,
    pub tasks: TaskStore,
    pub leaves: LeafCache,
    pub audit: AuditLog,
    pub metrics: Metrics,
    /// Read again at each reload (a `file:` token rotated in place, an `exec:` one reissued).
    admin_token: ArcSwap<Secret>,
    /// The admin token before the last rotation, still looked for by the egress scan.
    admin_token_retired: arc_swap::ArcSwapOption<Secret>,
    pub ca_path: PathBuf,
    /// Where keyward listens, once bound; never a destination.
    pub listeners: Arc<OwnListeners>,
    shutdown: tokio::sync::watch::Sender<bool>,
    /// When shutdown's drain runs out (set when shutdown begins).
    drain_ends: std::sync::OnceLock<std::time::Instant>,
    /// Set by a second SIGTERM/SIGINT: the drain ends now.
    drain_cut: tokio::sync::watch::Sender<bool>,
    request_ids: RequestIds,
    /// Requests (and WebSocket relays) cut by the stop: their records say `shutdown`.
    cut_by_stop: std::sync::atomic::AtomicU64,
    /// One reload at a time, each reading the file when its turn comes: two that overlapped
    /// (a slow credential `exec`) swapped in whichever finished last, an older file's policy.
    reloading: tokio::sync::Mutex<()>,
}

impl State {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        generation: Generation,
        config_path: PathBuf,
        leaves: LeafCache,
        audit: AuditLog,
        metrics: Metrics,
        admin_token: Secret,
        ca_path: PathBuf,
        listeners: Arc<OwnListeners>,
    ) -> State {
        // The policy it starts with fixes what only a restart changes.
        let started = generation.policy.policy();
        metrics.know_services(metric_series(started));
        let tasks = TaskStore::with_limit(started.admin.max_tasks);
        State {
            settings: started.proxy.clone(),
            restart_only: RestartOnly::of(started),
            generation: ArcSwap::from_pointee(generation),
            swapped: tokio::sync::watch::Sender::new(0),
            config_path,
            tasks,
            leaves,
            audit,
            metrics,
            admin_token: ArcSwap::from_pointee(admin_token),
            admin_token_retired: arc_swap::ArcSwapOption::empty(),
            ca_path,
            listeners,
            shutdown: tokio::sync::watch::Sender::new(false),
            drain_ends: std::sync::OnceLock::new(),
            drain_cut: tokio::sync::watch::Sender::new(false),
            request_ids: RequestIds::new(),
            cut_by_stop: std::sync::atomic::AtomicU64::new(0),
            reloading: tokio::sync::Mutex::new(()),
        }
    }

    /// Whether `token` is the admin token, compared in constant time.
    pub fn is_admin_token(&self, token: &[u8]) -> bool {
        self.admin_token.load().ct_eq(token)
    }

    /// Reads the admin token's source again: a rotated token applies from now on, the old
    /// one no longer. On failure the current token stays (an admin API nobody can reach
    /// would be worse).
    async fn reread_admin_token(&self) {
        let source = &self.restart_only.admin.token;
        match crate::credentials::read_source(source).await {
            Ok(token) if !self.admin_token.load().ct_eq(token.expose().as_bytes()) => {
                crate::app::warn_if_short(&token);
                let old = self.admin_token.swap(Arc::new(token));
                self.admin_token_retired.store(Some(old));
                // Looked for from now on, whether or not the policy reload that follows works.
                self.current().credentials.set_own(&self.own_secrets());
                tracing::info!("the admin token changed at its source; the new one applies now");
            }
            Ok(_) => {}
            Err(why) => {
                tracing::warn!(%why, "cannot read the admin token again; the current one stays")
            }
        }
    }

    /// keyward's own secrets the egress scan looks for: the admin token, and the one before
    /// its last rotation.
    fn own_secrets(&self) -> Vec<Arc<Secret>> {
        let current = self.admin_token.load_full();
        std::iter::once(current)
            .chain(self.admin_token_retired.load_full())
            .collect()
    }

    /// The generation that decides requests starting now.
    pub fn current(&self) -> Arc<Generation> {
        self.generation.load_full()
    }

    /// Loads the policy file again; an invalid policy leaves the old one serving.
    pub async fn reload(&self) -> Result<Reloaded, PolicyErrors> {
        let _turn = self.reloading.lock().await;
        // Log rotation sends the same signal; the audit file reopens whatever the policy says.
        if let Err(e) = self.audit.reopen().await {
            tracing::warn!(error = %e, "could not reopen the audit log; writing to the old file");
        }
        self.reread_admin_token().await;
        let result = self.reload_from(&self.config_path).await;
        self.metrics
            .policy_reload(if result.is_ok() { "ok" } else { "error" });
        // Logged here, whichever asked (SIGHUP or `POST /v1/reload`): the operator reads why
        // in keyward's log either way.
        if let Err(errors) = &result {
            for e in &errors.0 {
                tracing::error!("{e}");
            }
            tracing::error!("reload failed; the previous policy keeps serving");
        }
        result
    }

    async fn reload_from(&self, path: &Path) -> Result<Reloaded, PolicyErrors> {
        // Reading and checking are blocking and, for a large policy, slow: off the workers.
        let owned = path.to_owned();
        let policy = match tokio::task::spawn_blocking(move || policy::load(&owned)).await {
            Ok(loaded) => loaded?,
            Err(_) => {
                let file = path.display().to_string();
                return Err(PolicyErrors::whole_file(&file, "reading the policy failed"));
            }
        };
        for w in policy.warnings() {
            tracing::warn!("{}: {w}", path.display());
        }
        let restart_required = self.restart_only.changed_in(&self.settings, &policy);
        let previous = self.current();
        let own = self.own_secrets();
        let generation = Generation::build(
            path,
            policy,
            &self.settings,
            &self.listeners,
            Some(&previous),
            &own,
        )
        .await?;
        let version = generation.policy.version().to_string();
        let credentials_unreadable: Vec<String> = generation
            .credentials
            .unreadable()
            .into_iter()
            .map(str::to_string)
            .collect();
        // SECURITY (SPEC §9): a task whose agent, or one of whose capabilities, the new policy
        // no longer has (or no longer grants that agent), or that runs longer than its agent's
        // new `max_ttl` allows, is refused from its next request on, for good (putting them
        // back later must not revive it); what it has in flight finishes.
        let compiled = &generation.policy;
        let too_long = |t: &crate::tasks::Task| {
            compiled.agent(&t.agent).is_some_and(|a| {
                t.expires_at
                    .duration_since(t.created_at)
                    .unwrap_or_default()
                    > a.max_ttl
            })
        };
        let must_end = |t: &crate::tasks::Task| match compiled.agent_grants(&t.agent) {
            None => true,
            Some(grants) => {
                too_long(t)
                    || t.intent
                        .iter()
                        .any(|g| match compiled.capability(&g.capability) {
                            Some((i, _)) => !grants.contains(i),
                            None => true,
                        })
            }
        };
        // A task that has expired already ended, and stays expired (as `DELETE` leaves it).
        let now = std::time::SystemTime::now();
        let orphaned: Vec<_> = self
            .tasks
            .list()
            .into_iter()
            .filter(|t| !t.is_revoked() && !t.is_expired(now) && must_end(t))
            .collect();
        self.metrics.know_services(metric_series(compiled.policy()));
        self.generation.store(Arc::new(generation));
        for task in &orphaned {
            self.tasks.withdraw(task);
        }
        // After the revocations: a channel of a revoked task ends as `task_revoked`.
        self.swapped.send_modify(|n| *n += 1);
        if !orphaned.is_empty() {
            const SHOWN: usize = 20;
            let mut ids: Vec<&str> = orphaned.iter().take(SHOWN).map(|t| t.id.as_str()).collect();
            if orphaned.len() > SHOWN {
                ids.push("…");
            }
            tracing::info!(
                count = orphaned.len(),
                tasks = %ids.join(","),
                "revoked the tasks whose agent or capabilities the policy no longer has, or that run longer than their agent's max_ttl now allows"
            );
        }
        tracing::info!(policy_version = %version, "policy reloaded");
        if !restart_required.is_empty() {
            tracing::warn!(
                keys = %restart_required.join(", "),
                "the reloaded policy changes settings that apply only after a restart; keyward keeps running with the old values"
            );
        }
        Ok(Reloaded {
            version,
            restart_required,
            credentials_unreadable,
        })
    }

    pub fn next_request_id(&self) -> String {
        self.request_ids.next()
    }

    /// Resolves once a reload swapped in a policy under which `allowed` no longer holds: for
    /// the open channels a policy allowed (a blind tunnel, a WebSocket relay), which are not
    /// requests that finish under the policy they started with, and end with the grant.
    pub async fn until_disallowed(&self, allowed: impl Fn(&Generation) -> bool) {
        let mut swaps = self.swapped.subscribe();
        // Looked at once first: a reload may have come between the decision and now.
        loop {
            if !allowed(&self.current()) {
                return;
            }
            if swaps.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    /// Counts a request (or relay) cut by the stop.
    pub fn count_cut_by_stop(&self) {
        self.cut_by_stop
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// How many requests (and relays) the stop cut.
    pub fn cut_by_stop(&self) -> u64 {
        self.cut_by_stop.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A receiver that changes once, when keyward begins to shut down.
    pub fn shutdown_signal(&self) -> tokio::sync::watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Resolves once shutdown has begun, also when it began before this was called. (A
    /// receiver's `changed()` misses a shutdown that began before it subscribed: a task first
    /// polled after a SIGTERM that came right at start-up never saw it, and held the exit for
    /// the whole drain.)
    pub async fn stopped(&self) {
        let mut signal = self.shutdown_signal();
        let _ = signal.wait_for(|&stopping| stopping).await;
    }

    /// Whether shutdown has begun.
    pub fn stopping(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Stops the listeners from accepting and asks connections to drain.
    pub fn begin_shutdown(&self) {
        let _ = self
            .drain_ends
            .set(std::time::Instant::now() + self.settings.shutdown_timeout);
        self.shutdown.send_replace(true);
    }

    /// Resolves once shutdown began and its drain ran out (never before).
    pub async fn drain_ended(&self) {
        self.stopped().await;
        let mut cut = self.drain_cut.subscribe();
        let runs_out = async {
            if let Some(&end) = self.drain_ends.get() {
                tokio::time::sleep_until(tokio::time::Instant::from_std(end)).await;
            }
        };
        tokio::select! {
            () = runs_out => {}
            _ = cut.wait_for(|&cut| cut) => {}
        }
    }

    /// Ends the drain now (a second SIGTERM/SIGINT): what is still in flight is cut and
    /// recorded (`shutdown`).
    pub fn cut_drain(&self) {
        self.drain_cut.send_replace(true);
    }

    /// Whether shutdown's drain has run out: what ends now was cut by keyward, not by the
    /// agent.
    pub fn drain_over(&self) -> bool {
        *self.drain_cut.borrow()
            || self
                .drain_ends
                .get()
                .is_some_and(|&end| std::time::Instant::now() >= end)
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }
}

/// What a reload did.
pub struct Reloaded {
    pub version: String,
    /// Keys the new file changes that keyward applies only at start (listeners, limits,
    /// timeouts, CA, audit sink); it keeps running with the old values.
    pub restart_required: Vec<&'static str>,
    /// Credentials of the new policy that cannot be read now (their requests are 502
    /// `credential_unavailable`, `/readyz` fails): valid policy, not yet a working one.
    pub credentials_unreadable: Vec<String>,
}

/// Settings a reload does not apply, besides `proxy.*` (kept in `State::settings`).
struct RestartOnly {
    admin: AdminSettings,
    ca: CaSettings,
    audit: AuditSettings,
}

impl RestartOnly {
    fn of(p: &Policy) -> RestartOnly {
        RestartOnly {
            admin: p.admin.clone(),
            ca: p.ca.clone(),
            audit: p.audit.clone(),
        }
    }

    /// The keys of `new` that differ from what keyward started with. Every field is named
    /// (no `..`), so a new setting cannot be forgotten here.
    fn changed_in(&self, proxy: &ProxySettings, new: &Policy) -> Vec<&'static str> {
        let ProxySettings {
            listen,
            header_read_timeout,
            idle_timeout,
            send_timeout,
            max_connections,
            max_task_in_flight,
            max_task_denials_per_second,
            max_task_connections,
            max_agent_connections,
            max_header_bytes,
            connect_timeout,
            upstream_timeout,
            shutdown_timeout,
        } = &new.proxy;
        let AdminSettings {
            listen: admin_listen,
            token,
            max_tasks,
        } = &new.admin;
        let CaSettings { cert, key } = &new.ca;
        let AuditSettings { path } = &new.audit;
        [
            ("proxy.listen", proxy.listen != *listen),
            (
                "proxy.header_read_timeout",
                proxy.header_read_timeout != *header_read_timeout,
            ),
            ("proxy.idle_timeout", proxy.idle_timeout != *idle_timeout),
            ("proxy.send_timeout", proxy.send_timeout != *send_timeout),
            (
                "proxy.max_connections",
                proxy.max_connections != *max_connections,
            ),
            (
                "proxy.max_task_in_flight",
                proxy.max_task_in_flight != *max_task_in_flight,
            ),
            (
                "proxy.max_task_denials_per_second",
                proxy.max_task_denials_per_second != *max_task_denials_per_second,
            ),
            (
                "proxy.max_task_connections",
                proxy.max_task_connections != *max_task_connections,
            ),
            (
                "proxy.max_agent_connections",
                proxy.max_agent_connections != *max_agent_connections,
            ),
            (
                "proxy.max_header_bytes",
                proxy.max_header_bytes != *max_header_bytes,
            ),
            (
                "proxy.connect_timeout",
                proxy.connect_timeout != *connect_timeout,
            ),
            (
                "proxy.upstream_timeout",
                proxy.upstream_timeout != *upstream_timeout,
            ),
            (
                "proxy.shutdown_timeout",
                proxy.shutdown_timeout != *shutdown_timeout,
            ),
            ("admin.listen", self.admin.listen != *admin_listen),
            ("admin.token", self.admin.token != *token),
            ("admin.max_tasks", self.admin.max_tasks != *max_tasks),
            ("ca.cert", self.ca.cert != *cert),
            ("ca.key", self.ca.key != *key),
            ("audit.path", self.audit.path != *path),
        ]
        .into_iter()
        .filter_map(|(key, changed)| changed.then_some(key))
        .collect()
    }
}

/// Request ids: a random per-process prefix and a counter — unique, cheap, and not guessable
/// across restarts.
struct RequestIds {
    prefix: String,
    counter: AtomicU64,
}

impl RequestIds {
    fn new() -> Self {
        RequestIds {
            prefix: tasks::random_hex(4),
            counter: AtomicU64::new(1),
        }
    }

    /// The prefix, then the counter as 12 hex digits (more once past 2^48).
    fn next(&self) -> String {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut id = String::with_capacity(self.prefix.len() + 16);
        id.push_str(&self.prefix);
        let digits = (64 - n.leading_zeros()).div_ceil(4).max(12);
        for i in (0..digits).rev() {
            id.push(char::from(HEX[((n >> (4 * i)) & 15) as usize]));
        }
        id
    }
}

/// Each service as `Metrics::know_services` takes it: name, reached over TLS, injects.
fn metric_series(policy: &Policy) -> impl Iterator<Item = (&str, bool, bool)> {
    policy.services.iter().map(|s| {
        (
            s.name.as_str(),
            s.scheme == crate::policy::Scheme::Https,
            s.inject.is_some(),
        )
    })
}

#[cfg(test)]
mod request_id_tests {
    use super::*;

    #[test]
    fn request_ids_are_the_prefix_and_a_zero_padded_hex_counter() {
        let ids = RequestIds::new();
        let first = ids.next();
        let second = ids.next();
        assert_eq!(first.len(), ids.prefix.len() + 12);
        assert!(first.ends_with("000000000001"), "{first}");
        assert!(second.ends_with("000000000002"), "{second}");
        ids.counter.store(0xabc_dead_beef_f00d, Ordering::Relaxed);
        assert!(ids.next().ends_with("abcdeadbeeff00d"));
    }
}
