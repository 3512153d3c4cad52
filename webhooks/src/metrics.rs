//! Webhook metrics, registered under the `keygate_webhook_` prefix.
//!
//! Invariant: labels hold endpoint and destination names (from the configuration) and fixed
//! reason words only: never a header, a body, an event id or a secret.

use std::sync::atomic::{AtomicI64, AtomicU64};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabels {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RejectLabels {
    pub endpoint: String,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub destination: String,
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationErrorLabels {
    pub destination: String,
    /// A fixed word per kind of error (`kafka_all_brokers_down`, `sqs`, …).
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    pub stage: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 24))
}

/// Every webhook metric.
#[derive(Debug)]
pub struct Metrics {
    pub received: Family<EndpointLabels, Counter>,
    pub rejected: Family<RejectLabels, Counter>,
    pub duplicates: Family<EndpointLabels, Counter>,
    pub unavailable: Family<StageLabels, Counter>,
    pub ack_duration: Histogram,
    pub deliveries: Family<OutcomeLabels, Counter>,
    pub delivery_latency: HistogramFamily<DestinationLabels>,
    pub retries: Family<DestinationLabels, Counter>,
    pub dead_letters: Family<DestinationLabels, Gauge<i64, AtomicI64>>,
    pub backlog: Family<DestinationLabels, Gauge<i64, AtomicI64>>,
    pub backlog_age: Family<DestinationLabels, Gauge<f64, AtomicU64>>,
    pub journal_failures: Counter,
    pub rejections_unrecorded: Counter,
    pub destination_errors: Family<DestinationErrorLabels, Counter>,
}

impl Metrics {
    /// Unregistered metrics (tests).
    pub fn new() -> Metrics {
        Metrics {
            received: Family::default(),
            rejected: Family::default(),
            duplicates: Family::default(),
            unavailable: Family::default(),
            ack_duration: Histogram::new(exponential_buckets(0.0001, 2.0, 20)),
            deliveries: Family::default(),
            delivery_latency: Family::new_with_constructor(latency_histogram),
            retries: Family::default(),
            dead_letters: Family::default(),
            backlog: Family::default(),
            backlog_age: Family::default(),
            journal_failures: Counter::default(),
            rejections_unrecorded: Counter::default(),
            destination_errors: Family::default(),
        }
    }

    /// Creates the metrics and registers them.
    pub fn register(registry: &mut Registry) -> Metrics {
        let metrics = Metrics::new();
        registry.register(
            "keygate_webhook_received",
            "Verified webhook events received (new within the dedup window)",
            metrics.received.clone(),
        );
        registry.register(
            "keygate_webhook_rejected",
            "Webhook requests refused (400/404/405/408/413), by reason",
            metrics.rejected.clone(),
        );
        registry.register(
            "keygate_webhook_duplicates",
            "Verified webhook events whose Stripe id was already received: acknowledged, not delivered again",
            metrics.duplicates.clone(),
        );
        registry.register(
            "keygate_webhook_unavailable",
            "Verified webhook events answered 503 because they could not be made durable, by stage (state, journal, secrets)",
            metrics.unavailable.clone(),
        );
        registry.register(
            "keygate_webhook_ack_duration_seconds",
            "Time from the whole request read to the 200 (verify, state fsync, WAL fsync)",
            metrics.ack_duration.clone(),
        );
        registry.register(
            "keygate_webhook_deliveries",
            "Delivery attempts by outcome (delivered, failed, dead_lettered, replayed)",
            metrics.deliveries.clone(),
        );
        registry.register(
            "keygate_webhook_delivery_latency_seconds",
            "Time from receiving an event to its delivery to a destination",
            metrics.delivery_latency.clone(),
        );
        registry.register(
            "keygate_webhook_retries",
            "Failed delivery attempts that will be retried",
            metrics.retries.clone(),
        );
        registry.register(
            "keygate_webhook_dead_letters",
            "Deliveries parked in the dead-letter state, per destination",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "keygate_webhook_backlog",
            "Deliveries pending (queued or in flight), per destination",
            metrics.backlog.clone(),
        );
        registry.register(
            "keygate_webhook_backlog_age_seconds",
            "Age of the oldest pending delivery's event, per destination (0 when none)",
            metrics.backlog_age.clone(),
        );
        registry.register(
            "keygate_webhook_journal_failures",
            "Webhook audit records (delivery outcomes, rejections) that could not be written to the audit log",
            metrics.journal_failures.clone(),
        );
        registry.register(
            "keygate_webhook_rejections_unrecorded",
            "Refused webhook requests not recorded in the audit log because too many records were waiting (a flood)",
            metrics.rejections_unrecorded.clone(),
        );
        registry.register(
            "keygate_webhook_destination_errors",
            "Errors of a destination's broker client (Kafka producer errors, failed SQS sends), by fixed error word",
            metrics.destination_errors.clone(),
        );
        metrics
    }

    pub(crate) fn destination_error(&self, destination: &str, error: &str) {
        self.destination_errors
            .get_or_create(&DestinationErrorLabels { destination: destination.into(), error: error.into() })
            .inc();
    }

    pub(crate) fn destination(name: &str) -> DestinationLabels {
        DestinationLabels { destination: name.to_owned() }
    }

    pub(crate) fn outcome(&self, destination: &str, outcome: &str) {
        self.deliveries
            .get_or_create(&OutcomeLabels { destination: destination.into(), outcome: outcome.into() })
            .inc();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
