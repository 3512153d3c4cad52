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
        Arc::new(metrics)
    }
}

/// Flushes the buffered log lines when dropped: hold it until the process exits.
#[must_use = "dropping the guard is the final flush of the log buffer"]
#[derive(Debug)]
pub struct LogGuard(());

impl Drop for LogGuard {
    fn drop(&mut self) {
        flush_logs();
    }
}

/// How often buffered log lines reach stderr when traffic is light.
pub const LOG_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// Buffered lines are written at once when they reach this size.
const LOG_FLUSH_BYTES: usize = 32 * 1024;

/// Log lines waiting for stderr.
///
/// Written here rather than with `tracing-appender`'s non-blocking writer: that hands every line
/// to a writer thread, and on a proxy pinned to one core the wake-up and the two context switches
/// per line cost more than the `write` they save (measured in docs/benchmarks.md). Appending to
/// a buffer under a mutex and writing it out by size or every [`LOG_FLUSH_INTERVAL`] keeps one
/// `write` per batch with no thread in between.
static LOG_BUFFER: std::sync::Mutex<Vec<u8>> = std::sync::Mutex::new(Vec::new());

fn write_to_stderr(bytes: &[u8]) {
    use std::io::Write;
    // Nowhere to report a failed write of the log itself.
    let _ = std::io::stderr().lock().write_all(bytes);
}

/// Writes every buffered log line to stderr now.
pub fn flush_logs() {
    if let Ok(mut buffer) = LOG_BUFFER.lock()
        && !buffer.is_empty()
    {
        write_to_stderr(&buffer);
        buffer.clear();
    }
}

/// The `tracing` writer: each formatted event arrives in one `write` call and is appended whole.
struct BufferedStderr;

impl std::io::Write for BufferedStderr {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        match LOG_BUFFER.lock() {
            Ok(mut buffer) => {
                buffer.extend_from_slice(bytes);
                if buffer.len() >= LOG_FLUSH_BYTES {
                    write_to_stderr(&buffer);
                    buffer.clear();
                }
            }
            Err(_) => write_to_stderr(bytes),
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs the global `tracing` subscriber. Logs go to stderr; stdout is kept for what a human
/// asked for (the quick-start banner, command output).
///
/// Lines are buffered and written in batches (see [`LOG_BUFFER`]); the caller flushes them every
/// [`LOG_FLUSH_INTERVAL`] with [`flush_logs`], a panic flushes them before its message, and the
/// returned guard flushes the tail on exit.
pub fn init_logging(config: &LogConfig) -> LogGuard {
    let filter = EnvFilter::try_new(&config.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(|| BufferedStderr);
    let result = match config.format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).try_init(),
        LogFormat::Text => builder.try_init(),
    };
    // A second init (tests running servers in one process) keeps the first subscriber.
    if result.is_ok() {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            flush_logs();
            previous(info);
        }));
    }
    LogGuard(())
}
