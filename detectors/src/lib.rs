//! keygate-detectors: anomaly detection over what keygate sees, explainable and citing its
//! records.
//!
//! Its job: take one [`Input`] per finished request (an audit row's plaintext columns) or per
//! received webhook event, keep a baseline per service (and per operation, currency or event
//! type where it applies), and raise an [`Alert`] that says what was expected, what was seen,
//! which detector, service and severity, and which audit `event_id`s triggered it. The same
//! [`Engine`] runs live (fed from the proxy's finishing phase) and in batch over the lake
//! (`auditlog anomalies`), so both agree.
//!
//! The detectors ([`Detector`] is their contract):
//! - [`rate::RequestRate`]: requests per hour per operation against an hour-of-week EWMA;
//!   surges and sudden silences;
//! - [`amount::Amount`]: robust z of the log-amount per operation and currency (DDSketch
//!   quartiles);
//! - [`refunds::Refunds`]: refund-to-charge ratios and refunded money over 1 h and 24 h;
//! - [`bursts::Bursts`]: bursts of declines, client errors, Stripe 5xx and keygate refusals
//!   against their share of traffic;
//! - [`first_seen::FirstSeen`]: a new connected account, currency, operation or key mode;
//! - [`webhook_surge::WebhookSurge`]: surges of disputes, early fraud warnings, failed payouts
//!   and failed invoice payments.
//!
//! Invariants, for the whole crate:
//! - pure logic: no I/O except [`EngineState::save`] / [`EngineState::load`] of the state file
//!   (atomic: temporary file, fsync, rename, fsync of the folder); no clock, no randomness in a
//!   detector (the [`simulate`] generator is seeded);
//! - never a panic on any input: every map is bounded (`max_series`, `max_values`,
//!   `max_cited`), arithmetic saturates;
//! - inputs carry no secret: the plaintext columns only (no payload), and alerts quote only
//!   those columns' values and counts;
//! - `shadow` mode changes only the [`Mode`] stamped on an alert, never what is learned.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod alert;
pub mod amount;
pub mod bursts;
pub mod config;
pub mod detector;
pub mod engine;
pub mod error;
pub mod first_seen;
pub mod input;
pub mod rate;
pub mod refunds;
pub mod simulate;
pub mod stats;
pub mod webhook_surge;

#[cfg(test)]
mod conformance;

pub use alert::{Alert, DetectorKind};
pub use config::{AnomaliesConfig, LiveConfig, Mode, Severity};
pub use detector::Detector;
pub use engine::{Engine, EngineState};
pub use error::DetectorError;
pub use input::{Input, RequestInput, WebhookInput, refusal_of};
