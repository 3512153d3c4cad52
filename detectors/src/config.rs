//! Configuration: one section per detector, each with `enabled`, `mode` and `severity`. Parsed
//! once (serde, unknown keys refused) and checked by [`AnomaliesConfig::validate`] before use.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::DetectorError;

/// `alert` raises; `shadow` only records what it would have raised (for tuning).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Alert,
    Shadow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl std::fmt::Display for Severity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        })
    }
}

impl std::fmt::Display for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mode::Alert => "alert",
            Mode::Shadow => "shadow",
        })
    }
}

/// The `anomalies` section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AnomaliesConfig {
    /// Most series (keys such as service × operation) one detector keeps; inputs for further
    /// keys are ignored and counted in the state's `dropped_inputs`.
    pub max_series: usize,
    pub request_rate: RequestRateConfig,
    pub amount: AmountConfig,
    pub refunds: RefundsConfig,
    pub bursts: BurstsConfig,
    pub first_seen: FirstSeenConfig,
    pub webhook_surge: WebhookSurgeConfig,
    /// The live path in keygate (ignored by `auditlog anomalies`).
    pub live: LiveConfig,
}

/// How keygate runs the detectors live, off the request path.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LiveConfig {
    /// Inputs waiting for the detector task; when it is full, an input is dropped and counted
    /// (`keygate_anomaly_inputs_dropped_total`), never waited for.
    pub queue: usize,
    /// How often the learned state is saved to `state_file` (and once at shutdown).
    #[serde(with = "humantime_serde")]
    pub save_interval: Duration,
    /// How often the detectors' clock moves without traffic (closing hours, finding silences).
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// How long an alert counts in the `keygate_anomalies_active` gauge.
    #[serde(with = "humantime_serde")]
    pub active_for: Duration,
    /// The state file; default `anomalies-state.json` in the data folder.
    pub state_file: Option<std::path::PathBuf>,
}

impl Default for LiveConfig {
    fn default() -> Self {
        LiveConfig {
            queue: 10_000,
            save_interval: Duration::from_secs(60),
            tick: Duration::from_secs(10),
            active_for: Duration::from_secs(3600),
            state_file: None,
        }
    }
}

impl Default for AnomaliesConfig {
    fn default() -> Self {
        AnomaliesConfig {
            max_series: 10_000,
            request_rate: RequestRateConfig::default(),
            amount: AmountConfig::default(),
            refunds: RefundsConfig::default(),
            bursts: BurstsConfig::default(),
            first_seen: FirstSeenConfig::default(),
            webhook_surge: WebhookSurgeConfig::default(),
            live: LiveConfig::default(),
        }
    }
}

/// Request rate per service and operation, hour by hour, against an EWMA per hour of the week.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RequestRateConfig {
    pub enabled: bool,
    pub mode: Mode,
    pub severity: Severity,
    /// Weight of the newest week in an hour-of-week slot's EWMA (0 < alpha <= 1).
    pub alpha: f64,
    /// Weeks a slot must have seen before it judges an hour.
    pub min_weeks: u32,
    /// A surge is more than `mean + surge_sigmas × sd` requests in the hour, where
    /// `sd² = learned variance + mean (Poisson) + (relative_noise × mean)²` ...
    pub surge_sigmas: f64,
    /// ... and at least `surge_min_ratio × mean` and `mean + surge_min_excess`.
    pub surge_min_ratio: f64,
    pub surge_min_excess: f64,
    pub relative_noise: f64,
    /// A silence is an hour with at most `silence_ratio × mean` requests where the slot expects
    /// at least `silence_min_expected`.
    pub silence_ratio: f64,
    pub silence_min_expected: f64,
    /// Most event ids an alert cites.
    pub max_cited: usize,
}

impl Default for RequestRateConfig {
    fn default() -> Self {
        RequestRateConfig {
            enabled: true,
            mode: Mode::Alert,
            severity: Severity::Warning,
            alpha: 0.3,
            min_weeks: 2,
            surge_sigmas: 5.0,
            surge_min_ratio: 2.0,
            surge_min_excess: 20.0,
            relative_noise: 0.2,
            silence_ratio: 0.1,
            silence_min_expected: 20.0,
            max_cited: 20,
        }
    }
}

/// Amounts per service, operation and currency: robust z of the log-amount.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmountConfig {
    pub enabled: bool,
    pub mode: Mode,
    pub severity: Severity,
    /// The baseline is the amounts of the last one to two windows (two sketches rotate).
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Amounts a series must have seen before it judges.
    pub min_samples: u64,
    /// Flag when `(ln amount − ln median) / σ ≥ z_threshold`, σ = (ln q75 − ln q25) / 1.349 ...
    pub z_threshold: f64,
    /// ... and the amount is at least `min_ratio` × the median.
    pub min_ratio: f64,
    /// Also flag amounts that far below the median.
    pub flag_low: bool,
}

impl Default for AmountConfig {
    fn default() -> Self {
        AmountConfig {
            enabled: true,
            mode: Mode::Alert,
            severity: Severity::Critical,
            window: Duration::from_secs(14 * 86_400),
            min_samples: 200,
            z_threshold: 5.0,
            min_ratio: 10.0,
            flag_low: false,
        }
    }
}

/// One rolling window of the refunds detector.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefundWindow {
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Refunds the window must hold before a ratio is judged.
    pub min_refunds: u64,
    /// Most refunds per charge (counts) in the window.
    pub max_count_ratio: f64,
    /// Most refunded money per charged money, per currency.
    pub max_amount_ratio: f64,
    /// Most refunded money per currency (minor units), whatever was charged.
    #[serde(default)]
    pub max_refunded: BTreeMap<String, i64>,
}

/// Refunds against charges, per service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RefundsConfig {
    pub enabled: bool,
    pub mode: Mode,
    pub severity: Severity,
    pub charge_operations: Vec<String>,
    pub refund_operations: Vec<String>,
    pub windows: Vec<RefundWindow>,
    pub max_cited: usize,
}

impl Default for RefundsConfig {
    fn default() -> Self {
        RefundsConfig {
            enabled: true,
            mode: Mode::Alert,
            severity: Severity::Critical,
            charge_operations: vec![
                "POST /v1/charges".into(),
                "POST /v1/payment_intents".into(),
                "POST /v1/checkout/sessions".into(),
            ],
            refund_operations: vec![
                "POST /v1/refunds".into(),
                "POST /v1/charges/{charge}/refund".into(),
                "POST /v1/charges/{charge}/refunds".into(),
            ],
            windows: vec![
                RefundWindow {
                    window: Duration::from_secs(3600),
                    min_refunds: 10,
                    max_count_ratio: 0.5,
                    max_amount_ratio: 0.5,
                    max_refunded: BTreeMap::new(),
                },
                RefundWindow {
                    window: Duration::from_secs(86_400),
                    min_refunds: 30,
                    max_count_ratio: 0.25,
                    max_amount_ratio: 0.25,
                    max_refunded: BTreeMap::new(),
                },
            ],
            max_cited: 20,
        }
    }
}

/// Bursts of declines (402), client errors (other 4xx from Stripe), Stripe 5xx (and unreachable
/// Stripe) and keygate's own refusals, per service, in fixed buckets against each category's
/// learned share of the service's traffic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BurstsConfig {
    pub enabled: bool,
    pub mode: Mode,
    pub severity: Severity,
    #[serde(with = "humantime_serde")]
    pub bucket: Duration,
    /// EWMA weight of the newest bucket.
    pub alpha: f64,
    /// Buckets with traffic a service must have seen before it judges.
    pub min_buckets: u32,
    /// A burst: at least `min_count` in the bucket, more than `min_ratio ×` the expected count,
    /// and more than `expected + sigmas × sqrt(expected + 1)`; expected = the bucket's requests ×
    /// the category's learned share (at least `min_share`).
    pub min_count: u64,
    pub min_ratio: f64,
    pub sigmas: f64,
    pub min_share: f64,
    pub max_cited: usize,
}

impl Default for BurstsConfig {
    fn default() -> Self {
        BurstsConfig {
            enabled: true,
            mode: Mode::Alert,
            severity: Severity::Warning,
            bucket: Duration::from_secs(300),
            alpha: 0.05,
            min_buckets: 12,
            min_count: 20,
            min_ratio: 3.0,
            sigmas: 5.0,
            min_share: 0.002,
            max_cited: 20,
        }
    }
}

/// Which values the first-sighting detector watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Dimension {
    ConnectedAccount,
    Currency,
    Operation,
    KeyMode,
}

impl Dimension {
    pub fn as_str(self) -> &'static str {
        match self {
            Dimension::ConnectedAccount => "connected_account",
            Dimension::Currency => "currency",
            Dimension::Operation => "operation",
            Dimension::KeyMode => "key_mode",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirstSeenConfig {
    pub enabled: bool,
    pub mode: Mode,
    pub severity: Severity,
    /// How long after a service's first record new values are learned silently.
    #[serde(with = "humantime_serde")]
    pub learn_for: Duration,
    pub dimensions: Vec<Dimension>,
    /// Most values kept per service and dimension; past it, new values are neither kept nor
    /// flagged.
    pub max_values: usize,
}

impl Default for FirstSeenConfig {
    fn default() -> Self {
        FirstSeenConfig {
            enabled: true,
            mode: Mode::Alert,
            severity: Severity::Info,
            learn_for: Duration::from_secs(7 * 86_400),
            dimensions: vec![
                Dimension::ConnectedAccount,
                Dimension::Currency,
                Dimension::Operation,
                Dimension::KeyMode,
            ],
            max_values: 10_000,
        }
    }
}

/// Surges of watched webhook event types per endpoint, in buckets against an EWMA.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookSurgeConfig {
    pub enabled: bool,
    pub mode: Mode,
    pub severity: Severity,
    pub event_types: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub bucket: Duration,
    pub alpha: f64,
    pub min_buckets: u32,
    /// A surge: at least `min_count`, `min_ratio ×` the mean, and `mean + sigmas × sd`.
    pub min_count: u64,
    pub min_ratio: f64,
    pub sigmas: f64,
    pub max_cited: usize,
}

impl Default for WebhookSurgeConfig {
    fn default() -> Self {
        WebhookSurgeConfig {
            enabled: true,
            mode: Mode::Alert,
            severity: Severity::Critical,
            event_types: vec![
                "charge.dispute.created".into(),
                "radar.early_fraud_warning.created".into(),
                "payout.failed".into(),
                "invoice.payment_failed".into(),
            ],
            bucket: Duration::from_secs(3600),
            alpha: 0.05,
            min_buckets: 24,
            min_count: 10,
            min_ratio: 3.0,
            sigmas: 5.0,
            max_cited: 20,
        }
    }
}

fn check(ok: bool, what: impl FnOnce() -> String) -> Result<(), DetectorError> {
    if ok { Ok(()) } else { Err(DetectorError::Config(what())) }
}

fn unit(name: &str, v: f64) -> Result<(), DetectorError> {
    check(v > 0.0 && v <= 1.0, || format!("{name} is {v}; it must be in (0, 1]"))
}

fn positive(name: &str, v: f64) -> Result<(), DetectorError> {
    check(v.is_finite() && v > 0.0, || format!("{name} is {v}; it must be a positive number"))
}

fn non_negative(name: &str, v: f64) -> Result<(), DetectorError> {
    check(v.is_finite() && v >= 0.0, || format!("{name} is {v}; it must be zero or more"))
}

fn duration(name: &str, d: Duration, min: Duration) -> Result<(), DetectorError> {
    check(d >= min && d <= Duration::from_secs(366 * 86_400), || {
        format!(
            "{name} is {}; it must be between {} and 366 days",
            humantime::format_duration(d),
            humantime::format_duration(min)
        )
    })
}

impl AnomaliesConfig {
    /// Checks every range; the error names the key (`anomalies.<detector>.<key>`).
    pub fn validate(&self) -> Result<(), DetectorError> {
        check(self.max_series >= 1, || "anomalies.max_series must be at least 1".into())?;
        let r = &self.request_rate;
        unit("anomalies.request_rate.alpha", r.alpha)?;
        check(r.min_weeks >= 1, || "anomalies.request_rate.min_weeks must be at least 1".into())?;
        positive("anomalies.request_rate.surge_sigmas", r.surge_sigmas)?;
        check(r.surge_min_ratio.is_finite() && r.surge_min_ratio >= 1.0, || {
            format!("anomalies.request_rate.surge_min_ratio is {}; it must be 1 or more", r.surge_min_ratio)
        })?;
        non_negative("anomalies.request_rate.surge_min_excess", r.surge_min_excess)?;
        non_negative("anomalies.request_rate.relative_noise", r.relative_noise)?;
        check(r.silence_ratio.is_finite() && (0.0..1.0).contains(&r.silence_ratio), || {
            format!("anomalies.request_rate.silence_ratio is {}; it must be in [0, 1)", r.silence_ratio)
        })?;
        positive("anomalies.request_rate.silence_min_expected", r.silence_min_expected)?;
        let a = &self.amount;
        duration("anomalies.amount.window", a.window, Duration::from_secs(3600))?;
        check(a.min_samples >= 10, || "anomalies.amount.min_samples must be at least 10".into())?;
        positive("anomalies.amount.z_threshold", a.z_threshold)?;
        check(a.min_ratio.is_finite() && a.min_ratio >= 1.0, || {
            format!("anomalies.amount.min_ratio is {}; it must be 1 or more", a.min_ratio)
        })?;
        let f = &self.refunds;
        check(!f.windows.is_empty() || !f.enabled, || {
            "anomalies.refunds.windows is empty; give at least one window or set enabled: false".into()
        })?;
        for (i, w) in f.windows.iter().enumerate() {
            duration(&format!("anomalies.refunds.windows[{i}].window"), w.window, Duration::from_secs(60))?;
            check(w.window <= Duration::from_secs(7 * 86_400), || {
                format!("anomalies.refunds.windows[{i}].window must be at most 7 days")
            })?;
            positive(&format!("anomalies.refunds.windows[{i}].max_count_ratio"), w.max_count_ratio)?;
            positive(&format!("anomalies.refunds.windows[{i}].max_amount_ratio"), w.max_amount_ratio)?;
            for (currency, cap) in &w.max_refunded {
                check(*cap > 0, || {
                    format!("anomalies.refunds.windows[{i}].max_refunded.{currency} must be positive (minor units)")
                })?;
            }
        }
        let b = &self.bursts;
        duration("anomalies.bursts.bucket", b.bucket, Duration::from_secs(10))?;
        unit("anomalies.bursts.alpha", b.alpha)?;
        check(b.min_count >= 1, || "anomalies.bursts.min_count must be at least 1".into())?;
        check(b.min_ratio.is_finite() && b.min_ratio >= 1.0, || {
            format!("anomalies.bursts.min_ratio is {}; it must be 1 or more", b.min_ratio)
        })?;
        positive("anomalies.bursts.sigmas", b.sigmas)?;
        unit("anomalies.bursts.min_share", b.min_share)?;
        let s = &self.first_seen;
        check(s.learn_for <= Duration::from_secs(366 * 86_400), || {
            "anomalies.first_seen.learn_for must be at most 366 days".into()
        })?;
        check(s.max_values >= 1, || "anomalies.first_seen.max_values must be at least 1".into())?;
        let w = &self.webhook_surge;
        duration("anomalies.webhook_surge.bucket", w.bucket, Duration::from_secs(10))?;
        unit("anomalies.webhook_surge.alpha", w.alpha)?;
        check(w.min_count >= 1, || "anomalies.webhook_surge.min_count must be at least 1".into())?;
        check(w.min_ratio.is_finite() && w.min_ratio >= 1.0, || {
            format!("anomalies.webhook_surge.min_ratio is {}; it must be 1 or more", w.min_ratio)
        })?;
        positive("anomalies.webhook_surge.sigmas", w.sigmas)?;
        let l = &self.live;
        check((1..=1_000_000).contains(&l.queue), || {
            format!("anomalies.live.queue is {}; it must be between 1 and 1000000", l.queue)
        })?;
        duration("anomalies.live.save_interval", l.save_interval, Duration::from_secs(1))?;
        duration("anomalies.live.tick", l.tick, Duration::from_millis(100))?;
        duration("anomalies.live.active_for", l.active_for, Duration::from_secs(1))?;
        Ok(())
    }
}

pub(crate) fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_yaml_parses_with_unknown_keys_refused() {
        AnomaliesConfig::default().validate().unwrap();
        let c: AnomaliesConfig = serde_saphyr::from_str(
            "amount:\n  mode: shadow\n  window: 7d\nbursts:\n  bucket: 1m\nrefunds:\n  windows:\n    - {window: 1h, min_refunds: 5, max_count_ratio: 0.4, max_amount_ratio: 0.4, max_refunded: {usd: 100000}}\n",
        )
        .unwrap();
        assert_eq!(c.amount.mode, Mode::Shadow);
        assert_eq!(c.amount.window, Duration::from_secs(7 * 86_400));
        assert_eq!(c.refunds.windows[0].max_refunded["usd"], 100_000);
        c.validate().unwrap();
        assert!(serde_saphyr::from_str::<AnomaliesConfig>("amount:\n  windoe: 7d\n").is_err());
    }

    #[test]
    fn out_of_range_values_are_named() {
        let mut c = AnomaliesConfig::default();
        c.request_rate.alpha = 0.0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("anomalies.request_rate.alpha"), "{e}");
        let mut c = AnomaliesConfig::default();
        c.bursts.bucket = Duration::from_secs(1);
        assert!(c.validate().unwrap_err().to_string().contains("anomalies.bursts.bucket"));
    }
}
