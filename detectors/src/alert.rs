//! An alert: what was expected, what was seen, and the records behind it.

use serde::{Deserialize, Serialize};

use crate::config::{Mode, Severity};

/// Which detector raised an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DetectorKind {
    /// Requests per hour of one operation against its hour-of-week baseline (surge or silence).
    RequestRate,
    /// One amount far from the service's amounts of that operation and currency.
    Amount,
    /// Refunds against charges over a rolling window.
    Refunds,
    /// A burst of declines, client errors, Stripe 5xx or keygate refusals.
    Bursts,
    /// A connected account, currency, operation or key mode never seen for the service.
    FirstSeen,
    /// A surge of a watched webhook event type.
    WebhookSurge,
}

impl DetectorKind {
    pub const ALL: [DetectorKind; 6] = [
        DetectorKind::RequestRate,
        DetectorKind::Amount,
        DetectorKind::Refunds,
        DetectorKind::Bursts,
        DetectorKind::FirstSeen,
        DetectorKind::WebhookSurge,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DetectorKind::RequestRate => "request_rate",
            DetectorKind::Amount => "amount",
            DetectorKind::Refunds => "refunds",
            DetectorKind::Bursts => "bursts",
            DetectorKind::FirstSeen => "first_seen",
            DetectorKind::WebhookSurge => "webhook_surge",
        }
    }
}

impl std::fmt::Display for DetectorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One anomaly. An alert in [`Mode::Shadow`] is a record of what the detector would have raised:
/// consumers log and store it as such, and never page on it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub detector: DetectorKind,
    pub service: String,
    /// What the detector watched: an operation, `usd` / `POST /v1/charges usd`, `declines`,
    /// `connected_account acct_…`, an event type.
    pub subject: String,
    pub severity: Severity,
    pub mode: Mode,
    /// When it was raised (the time of the input or clock tick that raised it), µs since epoch.
    pub at_us: i64,
    /// The span of records judged, µs since epoch (an hour, a bucket, a rolling window, one record).
    pub window_start_us: i64,
    pub window_end_us: i64,
    /// What the baseline led the detector to expect, in words.
    pub expected: String,
    /// What it saw instead, in words.
    pub observed: String,
    /// The numbers behind the two sentences.
    pub expected_value: f64,
    pub observed_value: f64,
    /// How far out it is, in the detector's own unit (standard deviations, robust z, ratio).
    pub score: f64,
    /// The audit `event_id`s (or webhook event ids) that triggered it; bounded by the detector's
    /// `max_cited`. Empty only for a silence, where there are no records to cite (its window says
    /// where to look); a silence cites the last record seen before it when there is one.
    pub event_ids: Vec<String>,
}

impl Alert {
    /// One line for a log or a table.
    pub fn summary(&self) -> String {
        format!(
            "{} {} {} [{}]: expected {}, observed {}",
            self.detector, self.service, self.subject, self.severity, self.expected, self.observed
        )
    }
}
