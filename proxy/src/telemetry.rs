//! Logs and metrics.
//!
//! Logs are JSON lines through `tracing`, one canonical line per request (target
//! `keygate::access`). Metrics are Prometheus text from `prometheus-client`. Invariant: labels and
//! log fields hold service names, operation templates, decisions, rule ids, status codes and
//! Stripe request ids only: never a header value, a body, a key or a token.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tracing_subscriber::EnvFilter;

use crate::config::{LogConfig, LogFormat};

/// Labels of the per-request counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub service: String,
    pub operation: String,
    pub decision: String,
    pub status_class: String,
}

/// Labels of the upstream latency histogram.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HostLabels {
    pub host: String,
}

/// Labels of the refusal counter.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// Labels of the bound-hit counter: which bound (`header_deadline`, `idle`, `max_connections`,
/// `http1_next_head`, `http2_keep_alive`, `body_deadline`, `buffered_bytes`,
/// `buffered_connection_share`, `buffered_service_share`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabels {
    pub limit: &'static str,
}

/// Every metric the proxy itself owns.
#[derive(Debug)]
pub struct ProxyMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Histogram,
    pub upstream_duration: Family<HostLabels, Histogram>,
    pub in_flight: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub open_connections: Gauge<i64, std::sync::atomic::AtomicI64>,
    pub refused: Family<ReasonLabels, Counter>,
    pub policy_reloads: Family<ReasonLabels, Counter>,
    pub upstream_retries: Counter<u64, AtomicU64>,
    /// Request phases that panicked (a bug): each was answered 500 and recorded.
    pub panics: Counter<u64, AtomicU64>,
    /// Each time a bound on what clients may hold (time, connections, buffered bytes) is hit.
    pub limit_hits: Family<LimitLabels, Counter>,
    /// Request-body bytes reserved in the buffer budget now (see `crate::budget`).
    pub buffered_bytes: Gauge<i64, std::sync::atomic::AtomicI64>,
}

impl ProxyMetrics {
    /// Creates the metrics and registers them under the `keygate_` prefix.
    pub fn register(registry: &mut Registry) -> Arc<ProxyMetrics> {
        let metrics = ProxyMetrics {
            requests: Family::default(),
            // 100 µs … ~100 s
            request_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 21)),
            upstream_duration: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 21))),
            in_flight: Gauge::default(),
            open_connections: Gauge::default(),
            refused: Family::default(),
            policy_reloads: Family::default(),
            upstream_retries: Counter::default(),
            panics: Counter::default(),
            limit_hits: Family::default(),
            buffered_bytes: Gauge::default(),
        };
        registry.register(
            "keygate_requests",
            "Requests by service, Stripe operation, policy decision and status class",
            metrics.requests.clone(),
        );
        registry.register(
            "keygate_request_duration_seconds",
            "Time from receiving a request to answering it",
            metrics.request_duration.clone(),
        );
        registry.register(
            "keygate_upstream_duration_seconds",
            "Time spent waiting for Stripe, by Stripe host",
            metrics.upstream_duration.clone(),
        );
        registry.register("keygate_requests_in_flight", "Requests being handled now", metrics.in_flight.clone());
        registry.register("keygate_connections_open", "Client connections open now", metrics.open_connections.clone());
        registry.register(
            "keygate_requests_refused",
            "Requests keygate answered itself without forwarding, by reason",
            metrics.refused.clone(),
        );
        registry.register(
            "keygate_policy_reloads",
            "Policy folder reloads by result (ok, rejected)",
            metrics.policy_reloads.clone(),
        );
        registry.register(
            "keygate_upstream_retries",
            "Requests retried once after Stripe refused a rotated key",
            metrics.upstream_retries.clone(),
        );
        registry.register(
            "keygate_limit_hits",
            "Times a bound on clients was hit, by bound (header_deadline, idle, max_connections, http1_next_head, \
             http2_keep_alive, body_deadline, buffered_bytes, buffered_connection_share, buffered_service_share)",
            metrics.limit_hits.clone(),
        );
        registry.register(
            "keygate_request_panics",
            "Request phases that panicked (a bug in keygate); each was answered 500 with its event id and recorded",
            metrics.panics.clone(),
        );
        registry.register(
            "keygate_log_lines_dropped",
            "Log lines that could not be written to stderr (a closed or full log sink) and were dropped",
            LOG_LINES_DROPPED.clone(),
        );
        registry.register(
            "keygate_buffered_bytes",
            "Request-body bytes held in the buffer budget now (limits.max_buffered_bytes)",
            metrics.buffered_bytes.clone(),
        );
        Arc::new(metrics)
    }
}

/// Log lines that could not be written (stderr closed or full), since start.
pub static LOG_LINES_DROPPED: std::sync::LazyLock<Counter> = std::sync::LazyLock::new(Counter::default);

/// stderr for the log: a line that cannot be written is dropped and counted
/// ([`LOG_LINES_DROPPED`], `keygate_log_lines_dropped_total`), never an error that reaches a
/// request. (`tracing-subscriber` reports a failed write by printing to stderr, which panics when
/// stderr itself is what failed; the writer therefore never fails and internal error reports
/// are off.)
#[derive(Debug, Clone, Copy, Default)]
pub struct DroppingStderr;

impl std::io::Write for DroppingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if std::io::Write::write_all(&mut std::io::stderr().lock(), buf).is_err() {
            LOG_LINES_DROPPED.inc();
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::Write::flush(&mut std::io::stderr());
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for DroppingStderr {
    type Writer = DroppingStderr;

    fn make_writer(&'a self) -> DroppingStderr {
        DroppingStderr
    }
}

/// Installs the global `tracing` subscriber. Logs go to stderr; stdout is kept for what a human
/// asked for (the quick-start banner, command output). A log sink that fails never fails a
/// request: see [`DroppingStderr`].
pub fn init_logging(config: &LogConfig) {
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder =
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(DroppingStderr).log_internal_errors(false);
    let result = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A second init (tests running servers in one process) keeps the first subscriber.
    let _ = result;
}
