//! Surges of watched webhook event types (disputes, early fraud warnings, failed payouts and
//! invoice payments) per endpoint, in buckets (1 hour by default) against an EWMA of the
//! bucket counts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::alert::{Alert, DetectorKind};
use crate::config::{WebhookSurgeConfig, micros};
use crate::detector::Detector;
use crate::input::Input;
use crate::stats::{Ewma, bucket_of, cite};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SurgeSeries {
    pub bucket: i64,
    pub count: u64,
    pub cited: Vec<String>,
    pub flagged: bool,
    pub in_episode: bool,
    pub base: Ewma,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WebhookSurgeState {
    /// Key: endpoint (service), event type.
    #[serde(with = "crate::stats::entries")]
    pub series: BTreeMap<(String, String), SurgeSeries>,
    pub dropped_inputs: u64,
}

#[derive(Debug)]
pub struct WebhookSurge {
    config: WebhookSurgeConfig,
    max_series: usize,
    pub(crate) state: WebhookSurgeState,
}

impl WebhookSurge {
    pub fn new(config: WebhookSurgeConfig, max_series: usize, state: WebhookSurgeState) -> Self {
        WebhookSurge { config, max_series, state }
    }

    fn close_until(config: &WebhookSurgeConfig, s: &mut SurgeSeries, bucket: i64) {
        if bucket <= s.bucket {
            return;
        }
        if !s.flagged {
            s.base.update(s.count as f64, config.alpha);
        }
        let idle = u64::try_from(bucket - s.bucket - 1).unwrap_or(0).min(10_000);
        s.base.update_zeros(idle, config.alpha);
        s.in_episode = s.flagged;
        s.bucket = bucket;
        s.count = 0;
        s.cited.clear();
        s.flagged = false;
    }
}

impl Detector for WebhookSurge {
    fn kind(&self) -> DetectorKind {
        DetectorKind::WebhookSurge
    }

    fn observe(&mut self, input: &Input, out: &mut Vec<Alert>) {
        let Input::Webhook(w) = input else { return };
        if !self.config.enabled || !self.config.event_types.iter().any(|t| t == &w.event_type) {
            return;
        }
        let width = micros(self.config.bucket);
        let bucket = bucket_of(w.at_us, width);
        let key = (w.service.clone(), w.event_type.clone());
        if !self.state.series.contains_key(&key) {
            if self.state.series.len() >= self.max_series {
                self.state.dropped_inputs += 1;
                return;
            }
            self.state.series.insert(key.clone(), SurgeSeries { bucket, ..SurgeSeries::default() });
        }
        let config = &self.config;
        let Some(s) = self.state.series.get_mut(&key) else { return };
        Self::close_until(config, s, bucket);
        s.count += 1;
        cite(&mut s.cited, &w.event_id, config.max_cited);
        if s.flagged || s.in_episode || s.base.n < config.min_buckets {
            return;
        }
        let m = s.base.mean.max(0.0);
        let sd = (s.base.var + m + 1.0).sqrt();
        let threshold = (config.min_count as f64).max(m * config.min_ratio).max(m + config.sigmas * sd);
        if s.count as f64 >= threshold {
            s.flagged = true;
            out.push(Alert {
                detector: DetectorKind::WebhookSurge,
                service: key.0.clone(),
                subject: key.1.clone(),
                severity: config.severity,
                mode: config.mode,
                at_us: w.at_us,
                window_start_us: s.bucket * width,
                window_end_us: (s.bucket + 1) * width,
                expected: format!(
                    "about {m:.1} {} events per {} (alert at {threshold:.0})",
                    key.1,
                    humantime::format_duration(config.bucket)
                ),
                observed: format!("{} so far in this {}", s.count, humantime::format_duration(config.bucket)),
                expected_value: m,
                observed_value: s.count as f64,
                score: (s.count as f64 - m) / sd,
                event_ids: s.cited.clone(),
            });
        }
    }

    fn advance(&mut self, now_us: i64, _out: &mut Vec<Alert>) {
        if !self.config.enabled {
            return;
        }
        let bucket = bucket_of(now_us, micros(self.config.bucket));
        for s in self.state.series.values_mut() {
            Self::close_until(&self.config, s, bucket);
        }
    }

    fn dropped_inputs(&self) -> u64 {
        self.state.dropped_inputs
    }
}
