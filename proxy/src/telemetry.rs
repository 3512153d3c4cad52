//! Logs and metrics.
//!
//! Logs are JSON lines through `tracing`, one canonical line per request (target
//! `keygate::access`; written by [`AccessLine`]'s own formatter when keygate's JSON subscriber is
//! installed, the same object `tracing-subscriber` would write). Metrics are Prometheus text from `prometheus-client`. Invariant: labels and
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
    // A second init (tests running servers in one process) keeps the first subscriber, and the
    // access line keeps going through it.
    if result.is_ok() && config.format == LogFormat::Json {
        JSON_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Set when [`init_logging`] installed keygate's own JSON subscriber: only then is the access
/// line written by [`AccessLine::emit`]'s own formatter (with any other subscriber, a test's or
/// the text format, it goes through `tracing` like every other event).
static JSON_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// The canonical line of one request (target `keygate::access`).
///
/// With the JSON format its line is written here, not by `tracing-subscriber`'s generic JSON
/// formatter: the same object (`timestamp`, `level`, `message`, the fields, `target`) in one
/// buffer and one `write`, without the formatter's per-field visitor, `Display` round trips and
/// escaping of strings that need none (its share of a request's instructions was 13 %).
/// Whether the line is written at all is still `tracing`'s filter's decision (`log.level`).
#[derive(Debug)]
pub struct AccessLine<'a> {
    pub event_id: &'a uuid::Uuid,
    pub peer: &'a std::net::SocketAddr,
    pub service: &'a str,
    pub method: &'a str,
    pub operation: &'a str,
    pub stripe_host: &'a str,
    pub decision: &'a str,
    pub rule: &'a str,
    pub reason: &'a str,
    pub status: u16,
    pub outcome: &'a str,
    pub error_code: &'a str,
    pub duration_us: u64,
    pub upstream_us: u64,
    pub request_id: &'a str,
}

impl AccessLine<'_> {
    /// Writes the line (if `log.level` lets `keygate::access` info events through).
    pub fn emit(&self) {
        if !JSON_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
            self.emit_through_tracing();
            return;
        }
        if !tracing::enabled!(target: "keygate::access", tracing::Level::INFO) {
            return;
        }
        ACCESS_LINE.with(|cell| {
            // A line being written on this thread already (not possible today: nothing here
            // logs) gets a buffer of its own rather than a panic.
            let mut own = Vec::new();
            let mut borrowed = cell.try_borrow_mut();
            let line = match &mut borrowed {
                Ok(buffer) => &mut **buffer,
                Err(_) => &mut own,
            };
            line.clear();
            self.write_json(line, std::time::SystemTime::now());
            if std::io::Write::write_all(&mut std::io::stderr().lock(), line).is_err() {
                LOG_LINES_DROPPED.inc();
            }
            // A rare long line does not keep its buffer.
            if line.capacity() > 16 * 1024 {
                *line = Vec::new();
            }
        });
    }

    fn emit_through_tracing(&self) {
        tracing::info!(
            target: "keygate::access",
            event_id = %self.event_id,
            peer = %self.peer,
            service = self.service,
            method = self.method,
            operation = self.operation,
            stripe_host = self.stripe_host,
            decision = self.decision,
            rule = self.rule,
            reason = self.reason,
            status = self.status,
            outcome = self.outcome,
            error_code = self.error_code,
            duration_us = self.duration_us,
            upstream_us = self.upstream_us,
            request_id = self.request_id,
            "request"
        );
    }

    /// The JSON object `tracing-subscriber` writes for this event (`flatten_event`), newline
    /// included.
    fn write_json(&self, out: &mut Vec<u8>, now: std::time::SystemTime) {
        use std::io::Write as _;
        // Writing into a `Vec` cannot fail.
        let _ = write!(
            out,
            "{{\"timestamp\":\"{}\",\"level\":\"INFO\",\"message\":\"request\"",
            humantime::format_rfc3339_micros(now)
        );
        let _ = write!(out, ",\"event_id\":\"{}\",\"peer\":\"{}\"", self.event_id, self.peer);
        for (name, value) in [
            ("service", self.service),
            ("method", self.method),
            ("operation", self.operation),
            ("stripe_host", self.stripe_host),
            ("decision", self.decision),
            ("rule", self.rule),
            ("reason", self.reason),
        ] {
            json_field(out, name, value);
        }
        let _ = write!(out, ",\"status\":{}", self.status);
        json_field(out, "outcome", self.outcome);
        json_field(out, "error_code", self.error_code);
        let _ = write!(out, ",\"duration_us\":{},\"upstream_us\":{}", self.duration_us, self.upstream_us);
        json_field(out, "request_id", self.request_id);
        out.extend_from_slice(b",\"target\":\"keygate::access\"}\n");
    }
}

thread_local! {
    static ACCESS_LINE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// `,"name":"value"`, the value escaped as JSON: copied as it is when it needs no escape (the
/// common case), else through serde_json's escaper.
fn json_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
    if value.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(value.as_bytes());
        out.push(b'"');
    } else if serde_json::to_writer(&mut *out, value).is_err() {
        // Not reachable for a `&str` into a `Vec`; an empty string keeps the line valid JSON.
        out.extend_from_slice(b"\"\"");
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// What `tracing-subscriber`'s JSON formatter, configured as [`init_logging`] configures it,
    /// writes for the access event.
    fn through_tracing(line: &AccessLine<'_>) -> serde_json::Value {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .finish();
        tracing::subscriber::with_default(subscriber, || line.emit_through_tracing());
        let bytes = captured.0.lock().unwrap().clone();
        assert_eq!(bytes.last(), Some(&b'\n'));
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn the_hand_written_access_line_is_the_object_tracing_writes() {
        let event_id = uuid::Uuid::now_v7();
        let peer: std::net::SocketAddr = "[::1]:54321".parse().unwrap();
        let awkward = "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7} é ☃ \u{2028} end";
        for (reason, request_id) in [("allowed by rule charges-small", "req_123"), (awkward, ""), ("", awkward)] {
            let line = AccessLine {
                event_id: &event_id,
                peer: &peer,
                service: "checkout",
                method: "POST",
                operation: "POST /v1/payment_intents",
                stripe_host: "api.stripe.com",
                decision: "allow",
                rule: "charges-small",
                reason,
                status: 402,
                outcome: "completed",
                error_code: "",
                duration_us: 1234,
                upstream_us: u64::MAX,
                request_id,
            };
            let mut ours = Vec::new();
            let now = std::time::SystemTime::now();
            line.write_json(&mut ours, now);
            assert_eq!(ours.last(), Some(&b'\n'));
            assert_eq!(ours.iter().filter(|&&b| b == b'\n').count(), 1, "one line");
            let mut ours: serde_json::Value = serde_json::from_slice(&ours).unwrap();
            let mut theirs = through_tracing(&line);
            let stamp = ours.as_object_mut().unwrap().remove("timestamp").unwrap();
            let their_stamp = theirs.as_object_mut().unwrap().remove("timestamp").unwrap();
            assert_eq!(ours, theirs);
            assert_eq!(ours["reason"], reason);
            assert_eq!(ours["upstream_us"], u64::MAX);
            // Same shape of timestamp (RFC 3339, microseconds, UTC), and it is `now`.
            let (stamp, their_stamp) = (stamp.as_str().unwrap(), their_stamp.as_str().unwrap());
            assert_eq!(stamp.len(), their_stamp.len(), "{stamp} vs {their_stamp}");
            assert_eq!(
                humantime::parse_rfc3339(stamp).unwrap(),
                now - std::time::Duration::from_nanos(u64::from(
                    now.duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() % 1000
                ),)
            );
            assert!(humantime::parse_rfc3339(their_stamp).is_ok(), "{their_stamp}");
        }
    }
}
