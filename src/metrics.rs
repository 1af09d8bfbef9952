//! Prometheus metrics: every metric name, help text and label set of SPEC §8 (plus the two
//! operational counters `keyward_secrets_redacted_total` and `keyward_audit_records_total`), in
//! one place, on a registry owned by [`Metrics`] (never the process-global one).
//!
//! Must never: take a label value that is not a policy name or a closed-enum string (no task id,
//! path, token, query or client address — SPEC §8 keeps labels bounded), or panic on a bad label.

use prometheus::core::Collector;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};
use std::sync::Mutex;

/// Metric names (SPEC §8). Dashboards depend on these exact strings.
pub const DECISIONS_TOTAL: &str = "keyward_decisions_total";
pub const REQUEST_DURATION_SECONDS: &str = "keyward_request_duration_seconds";
pub const UPSTREAM_ERRORS_TOTAL: &str = "keyward_upstream_errors_total";
pub const TASKS_ACTIVE: &str = "keyward_tasks_active";
pub const CONNECTIONS_OPEN: &str = "keyward_connections_open";
pub const TLS_LEAF_CERTS_ISSUED_TOTAL: &str = "keyward_tls_leaf_certs_issued_total";
pub const POLICY_RELOADS_TOTAL: &str = "keyward_policy_reloads_total";
pub const SECRETS_REDACTED_TOTAL: &str = "keyward_secrets_redacted_total";
/// The `kind` label of `keyward_upstream_errors_total`.
pub const UPSTREAM_ERROR_KINDS: [&str; 5] = ["dns", "connect", "tls", "timeout", "protocol"];
pub const AUDIT_RECORDS_TOTAL: &str = "keyward_audit_records_total";

/// Name, help and type of every family, so `render` can print HELP/TYPE even for a family
/// that has no sample yet (prometheus prunes empty families, which makes `absent()` alerts and
/// a first look at `/metrics` misleading).
const FAMILIES: [(&str, &str, &str); 9] = [
    (
        DECISIONS_TOTAL,
        "Decisions taken, by decision, reason, service, capability and agent.",
        "counter",
    ),
    (
        REQUEST_DURATION_SECONDS,
        "Duration of forwarded requests in seconds, by service.",
        "histogram",
    ),
    (
        UPSTREAM_ERRORS_TOTAL,
        "Upstream failures (dns, connect, tls, timeout, protocol), by service and kind.",
        "counter",
    ),
    (
        TASKS_ACTIVE,
        "Tasks that are neither expired nor revoked, by agent.",
        "gauge",
    ),
    (
        CONNECTIONS_OPEN,
        "Open client connections, by kind (http, tunnel, intercepted).",
        "gauge",
    ),
    (
        TLS_LEAF_CERTS_ISSUED_TOTAL,
        "Leaf certificates signed by the keyward CA.",
        "counter",
    ),
    (
        POLICY_RELOADS_TOTAL,
        "Policy reload attempts, by result (ok, error).",
        "counter",
    ),
    (
        SECRETS_REDACTED_TOTAL,
        "Credential values redacted before they could reach an agent, by service.",
        "counter",
    ),
    (
        AUDIT_RECORDS_TOTAL,
        "Audit records written to the audit log.",
        "counter",
    ),
];

/// Buckets for `keyward_request_duration_seconds`: 1 ms .. 60 s. A proxy sees both fast API
/// calls (a few ms) and long model completions or streams (tens of seconds); anything past 60 s
/// lands in +Inf, which is still counted in `_count` and `_sum`.
pub const DURATION_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The `kind` label of `keyward_connections_open` (SPEC §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ConnKind {
    /// A client connection speaking plain HTTP to the proxy.
    Http,
    /// A blind (passthrough) CONNECT tunnel.
    Tunnel,
    /// A CONNECT tunnel whose TLS keyward terminates.
    Intercepted,
}

impl ConnKind {
    pub const ALL: [ConnKind; 3] = [ConnKind::Http, ConnKind::Tunnel, ConnKind::Intercepted];

    pub fn as_str(self) -> &'static str {
        match self {
            ConnKind::Http => "http",
            ConnKind::Tunnel => "tunnel",
            ConnKind::Intercepted => "intercepted",
        }
    }

    fn index(self) -> usize {
        match self {
            ConnKind::Http => 0,
            ConnKind::Tunnel => 1,
            ConnKind::Intercepted => 2,
        }
    }
}

/// Building the registry failed. Only a programming error (an invalid name, a duplicate
/// registration) can cause it; a unit test builds the registry, so it never ships.
#[derive(Debug, thiserror::Error)]
#[error("cannot build the metrics registry: {0}")]
pub struct MetricsError(#[from] prometheus::Error);

/// Every keyward metric. Label lookups (`get_metric_with_label_values`) hash the label values
/// and take a read lock; after the first use of a label set they do not allocate. If that ever
/// shows up in a profile, cache the child handles per (service, capability) in the compiled
/// policy instead.
pub struct Metrics {
    registry: Registry,
    decisions: IntCounterVec,
    request_duration: HistogramVec,
    upstream_errors: IntCounterVec,
    tasks_active: IntGaugeVec,
    // Resolved once: the label set is closed, so the hot path is a plain atomic.
    connections_open: [IntGauge; 3],
    leaf_issued: IntCounter,
    // Serializes `leaf_issued_total` so two concurrent syncs cannot both add the same delta.
    leaf_sync: Mutex<()>,
    reload_ok: IntCounter,
    reload_error: IntCounter,
    policy_reloads: IntCounterVec,
    secrets_redacted: IntCounterVec,
    audit_records: IntCounter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) -> Result<C, MetricsError> {
    registry.register(Box::new(c.clone()))?;
    Ok(c)
}

impl Metrics {
    /// Builds and registers every family on a fresh registry.
    pub fn new() -> Result<Self, MetricsError> {
        let registry = Registry::new();
        let help = |name: &str| {
            FAMILIES
                .iter()
                .find(|(n, _, _)| *n == name)
                .map_or("", |(_, h, _)| *h)
        };
        let counter_vec = |name: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help(name)), labels)?,
            )
        };

        let decisions = counter_vec(
            DECISIONS_TOTAL,
            &["decision", "reason", "service", "capability", "agent"],
        )?;
        let request_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(REQUEST_DURATION_SECONDS, help(REQUEST_DURATION_SECONDS))
                    .buckets(DURATION_BUCKETS.to_vec()),
                &["service"],
            )?,
        )?;
        let upstream_errors = counter_vec(UPSTREAM_ERRORS_TOTAL, &["service", "kind"])?;
        let tasks_active = register(
            &registry,
            IntGaugeVec::new(Opts::new(TASKS_ACTIVE, help(TASKS_ACTIVE)), &["agent"])?,
        )?;
        let connections = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(CONNECTIONS_OPEN, help(CONNECTIONS_OPEN)),
                &["kind"],
            )?,
        )?;
        let connections_open = [
            connections.get_metric_with_label_values(&[ConnKind::Http.as_str()])?,
            connections.get_metric_with_label_values(&[ConnKind::Tunnel.as_str()])?,
            connections.get_metric_with_label_values(&[ConnKind::Intercepted.as_str()])?,
        ];
        let leaf_issued = register(
            &registry,
            IntCounter::new(
                TLS_LEAF_CERTS_ISSUED_TOTAL,
                help(TLS_LEAF_CERTS_ISSUED_TOTAL),
            )?,
        )?;
        let policy_reloads = counter_vec(POLICY_RELOADS_TOTAL, &["result"])?;
        let reload_ok = policy_reloads.get_metric_with_label_values(&["ok"])?;
        let reload_error = policy_reloads.get_metric_with_label_values(&["error"])?;
        let secrets_redacted = counter_vec(SECRETS_REDACTED_TOTAL, &["service"])?;
        let audit_records = register(
            &registry,
            IntCounter::new(AUDIT_RECORDS_TOTAL, help(AUDIT_RECORDS_TOTAL))?,
        )?;

        Ok(Metrics {
            registry,
            decisions,
            request_duration,
            upstream_errors,
            tasks_active,
            connections_open,
            leaf_issued,
            leaf_sync: Mutex::new(()),
            reload_ok,
            reload_error,
            policy_reloads,
            secrets_redacted,
            audit_records,
        })
    }

    /// One decision (SPEC §4.3): `decision` and `reason` are the closed-enum words; `service`,
    /// `capability`, `agent` are policy names, or "" when unknown.
    pub fn decision(
        &self,
        decision: &str,
        reason: &str,
        service: &str,
        capability: &str,
        agent: &str,
    ) {
        if let Ok(c) = self
            .decisions
            .get_metric_with_label_values(&[decision, reason, service, capability, agent])
        {
            c.inc();
        }
    }

    /// Duration of one forwarded request, in seconds.
    pub fn request_duration(&self, service: &str, seconds: f64) {
        if let Ok(h) = self
            .request_duration
            .get_metric_with_label_values(&[service])
        {
            h.observe(seconds);
        }
    }

    /// Creates each service's series of the upstream-failure and redaction counters at 0:
    /// `increase()` cannot see a series that first appears at 1, so without them an alert on
    /// a pod's first TLS failure or first echoed credential would not fire. Each service is
    /// (name, reached over TLS, injects a credential): only the series that can grow.
    pub fn know_services<'a>(&self, services: impl IntoIterator<Item = (&'a str, bool, bool)>) {
        for (service, tls, injects) in services {
            for kind in UPSTREAM_ERROR_KINDS.iter().filter(|&&k| tls || k != "tls") {
                let _ = self
                    .upstream_errors
                    .get_metric_with_label_values(&[service, kind]);
            }
            if injects {
                let _ = self
                    .secrets_redacted
                    .get_metric_with_label_values(&[service]);
            }
        }
    }

    /// One upstream failure; `kind` is one of `UPSTREAM_ERROR_KINDS`.
    pub fn upstream_error(&self, service: &str, kind: &str) {
        if let Ok(c) = self
            .upstream_errors
            .get_metric_with_label_values(&[service, kind])
        {
            c.inc();
        }
    }

    pub fn tasks_active_set(&self, agent: &str, n: i64) {
        if let Ok(g) = self.tasks_active.get_metric_with_label_values(&[agent]) {
            g.set(n);
        }
    }

    /// Clears every agent's gauge before the live counts are set again at scrape time, so an
    /// agent whose tasks all ended shows no stale value.
    pub fn tasks_active_reset(&self) {
        self.tasks_active.reset();
    }

    pub fn tasks_active_add(&self, agent: &str, delta: i64) {
        if let Ok(g) = self.tasks_active.get_metric_with_label_values(&[agent]) {
            g.add(delta);
        }
    }

    /// Counts an open connection until the returned guard is dropped, so every exit path of a
    /// connection task (error, hang-up, panic unwind) decrements it.
    pub fn connection_opened(&self, kind: ConnKind) -> ConnGauge {
        let gauge = self.connections_open[kind.index()].clone();
        gauge.inc();
        ConnGauge(gauge)
    }

    /// `n` more leaf certificates were signed.
    pub fn leaf_issued(&self, n: u64) {
        self.leaf_issued.inc_by(n);
    }

    /// Raises the leaf counter to `total` (e.g. `LeafCache::issued_total()` read at scrape
    /// time). A counter never goes down, so a smaller `total` is ignored.
    pub fn leaf_issued_total(&self, total: u64) {
        let _serialized = self.leaf_sync.lock();
        let current = self.leaf_issued.get();
        if total > current {
            self.leaf_issued.inc_by(total - current);
        }
    }

    /// One policy reload; `result` is "ok" or "error" (anything else is counted under its own
    /// label, which the callers' tests rule out).
    pub fn policy_reload(&self, result: &str) {
        match result {
            "ok" => self.reload_ok.inc(),
            "error" => self.reload_error.inc(),
            other => {
                if let Ok(c) = self.policy_reloads.get_metric_with_label_values(&[other]) {
                    c.inc();
                }
            }
        }
    }

    /// `n` credential values were redacted for `service`.
    pub fn secrets_redacted(&self, service: &str, n: u64) {
        if let Ok(c) = self
            .secrets_redacted
            .get_metric_with_label_values(&[service])
        {
            c.inc_by(n);
        }
    }

    /// `n` audit records reached the audit sink (called by the audit writer once per batch).
    pub fn audit_records(&self, n: u64) {
        self.audit_records.inc_by(n);
    }

    /// A handle on the audit counter for the audit writer thread (one atomic add per batch).
    pub(crate) fn audit_records_counter(&self) -> IntCounter {
        self.audit_records.clone()
    }

    /// Prometheus text exposition format 0.0.4 (`Content-Type: text/plain; version=0.0.4`).
    pub fn render(&self) -> String {
        let families = self.registry.gather();
        let mut buf = Vec::with_capacity(8 * 1024);
        if let Err(e) = TextEncoder::new().encode(&families, &mut buf) {
            tracing::error!(error = %e, "cannot encode metrics");
        }
        let mut out = String::from_utf8(buf).unwrap_or_default();
        for (name, help, kind) in FAMILIES {
            if !families.iter().any(|f| f.name() == name) {
                out.push_str("# HELP ");
                out.push_str(name);
                out.push(' ');
                out.push_str(help);
                out.push_str("\n# TYPE ");
                out.push_str(name);
                out.push(' ');
                out.push_str(kind);
                out.push('\n');
            }
        }
        out
    }
}

/// Decrements `keyward_connections_open{kind}` when dropped.
#[must_use = "the connection is counted only while this guard lives"]
#[derive(Debug)]
pub struct ConnGauge(IntGauge);

impl Drop for ConnGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn fresh_registry_renders_help_and_type_for_every_family() {
        let m = Metrics::new().unwrap();
        let text = m.render();
        for (name, _, kind) in FAMILIES {
            assert!(text.contains(&format!("# HELP {name} ")), "{name} HELP");
            assert!(
                text.contains(&format!("# TYPE {name} {kind}\n")),
                "{name} TYPE"
            );
        }
    }

    #[test]
    fn every_metric_renders_with_its_labels() {
        let m = Metrics::new().unwrap();
        m.decision("deny", "route_not_in_intent", "github", "", "triage-bot");
        m.decision("deny", "route_not_in_intent", "github", "", "triage-bot");
        m.request_duration("github", 0.003);
        m.upstream_error("github", "timeout");
        m.tasks_active_set("triage-bot", 3);
        m.tasks_active_add("triage-bot", -1);
        let _c = m.connection_opened(ConnKind::Intercepted);
        m.leaf_issued(2);
        m.policy_reload("ok");
        m.policy_reload("error");
        m.secrets_redacted("openai", 4);
        m.audit_records(7);
        let text = m.render();

        let expect = [
            (
                "keyward_decisions_total{agent=\"triage-bot\",capability=\"\",decision=\"deny\",reason=\"route_not_in_intent\",service=\"github\"}",
                2.0,
            ),
            ("keyward_request_duration_seconds_count{service=\"github\"}", 1.0),
            (
                "keyward_request_duration_seconds_bucket{service=\"github\",le=\"0.005\"}",
                1.0,
            ),
            (
                "keyward_request_duration_seconds_bucket{service=\"github\",le=\"0.0025\"}",
                0.0,
            ),
            (
                "keyward_upstream_errors_total{kind=\"timeout\",service=\"github\"}",
                1.0,
            ),
            ("keyward_tasks_active{agent=\"triage-bot\"}", 2.0),
            ("keyward_connections_open{kind=\"intercepted\"}", 1.0),
            ("keyward_connections_open{kind=\"http\"}", 0.0),
            ("keyward_connections_open{kind=\"tunnel\"}", 0.0),
            ("keyward_tls_leaf_certs_issued_total", 2.0),
            ("keyward_policy_reloads_total{result=\"ok\"}", 1.0),
            ("keyward_policy_reloads_total{result=\"error\"}", 1.0),
            ("keyward_secrets_redacted_total{service=\"openai\"}", 4.0),
            ("keyward_audit_records_total", 7.0),
        ];
        for (series, value) in expect {
            assert_eq!(sample(&text, series), Some(value), "{series} in\n{text}");
        }
        for (name, _, kind) in FAMILIES {
            assert_eq!(text.matches(&format!("# TYPE {name} {kind}\n")).count(), 1);
        }
    }

    #[test]
    fn histogram_buckets_span_1ms_to_60s() {
        let m = Metrics::new().unwrap();
        m.request_duration("s", 120.0);
        let text = m.render();
        assert!(text.contains("le=\"0.001\""));
        assert!(text.contains("le=\"60\""));
        assert_eq!(
            sample(
                &text,
                "keyward_request_duration_seconds_bucket{service=\"s\",le=\"60\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                "keyward_request_duration_seconds_bucket{service=\"s\",le=\"+Inf\"}"
            ),
            Some(1.0)
        );
        assert!(DURATION_BUCKETS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn conn_gauge_decrements_on_drop() {
        let m = Metrics::new().unwrap();
        let a = m.connection_opened(ConnKind::Http);
        let b = m.connection_opened(ConnKind::Http);
        let t = m.connection_opened(ConnKind::Tunnel);
        let series = "keyward_connections_open{kind=\"http\"}";
        assert_eq!(sample(&m.render(), series), Some(2.0));
        drop(a);
        drop(t);
        assert_eq!(sample(&m.render(), series), Some(1.0));
        drop(b);
        assert_eq!(sample(&m.render(), series), Some(0.0));
        assert_eq!(
            sample(&m.render(), "keyward_connections_open{kind=\"tunnel\"}"),
            Some(0.0)
        );
    }

    #[test]
    fn leaf_total_sync_never_goes_down() {
        let m = Metrics::new().unwrap();
        let series = "keyward_tls_leaf_certs_issued_total";
        m.leaf_issued_total(5);
        m.leaf_issued_total(3);
        assert_eq!(sample(&m.render(), series), Some(5.0));
        m.leaf_issued_total(9);
        assert_eq!(sample(&m.render(), series), Some(9.0));
    }

    #[test]
    fn hostile_label_values_are_escaped_not_injected() {
        // Label values come from policy names, but even a name with quotes or a newline must
        // not break the exposition format into extra series.
        let m = Metrics::new().unwrap();
        m.decision("deny", "unknown_host", "a\"b\nkeyward_fake 1", "", "");
        let text = m.render();
        assert!(!text.lines().any(|l| l.starts_with("keyward_fake")));
    }

    #[test]
    fn registries_are_independent() {
        let a = Metrics::new().unwrap();
        let b = Metrics::new().unwrap();
        a.audit_records(1);
        assert_eq!(
            sample(&b.render(), "keyward_audit_records_total"),
            Some(0.0)
        );
    }
}
