//! Request rate per service and operation against an hour-of-week EWMA baseline: surges (raised
//! as soon as the hour's count passes the threshold) and silences (judged when the hour closes).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::alert::{Alert, DetectorKind};
use crate::config::RequestRateConfig;
use crate::detector::Detector;
use crate::input::Input;
use crate::stats::{Ewma, HOUR_US, cite, hour_of_week};

/// The operation name used for requests that matched none (refused before routing).
pub const NO_OPERATION: &str = "(no operation)";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RateSeries {
    /// The hour being counted (hours since the epoch).
    pub hour: i64,
    pub count: u64,
    pub cited: Vec<String>,
    /// A surge alert was raised for this hour.
    pub flagged: bool,
    /// The previous hour was anomalous (surge or silence), for one alert per episode.
    pub in_episode: bool,
    pub last_event: Option<String>,
    /// 168 slots, Monday 00:00 UTC first.
    pub slots: Vec<Ewma>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RateState {
    /// Key: `service` and operation.
    #[serde(with = "crate::stats::entries")]
    pub series: BTreeMap<(String, String), RateSeries>,
    pub dropped_inputs: u64,
}

#[derive(Debug)]
pub struct RequestRate {
    config: RequestRateConfig,
    max_series: usize,
    pub(crate) state: RateState,
}

impl RequestRate {
    pub fn new(config: RequestRateConfig, max_series: usize, state: RateState) -> Self {
        RequestRate { config, max_series, state }
    }

    /// The surge threshold for a slot, or `None` while the slot is still learning.
    fn threshold(config: &RequestRateConfig, slot: &Ewma) -> Option<(f64, f64)> {
        if slot.n < config.min_weeks {
            return None;
        }
        let m = slot.mean.max(0.0);
        let sd = (slot.var + m + (config.relative_noise * m).powi(2)).sqrt();
        let t = (m + config.surge_sigmas * sd).max(m * config.surge_min_ratio).max(m + config.surge_min_excess);
        Some((t, sd))
    }

    /// Closes every hour of `s` before `hour` (at most one week of idle hours is walked).
    fn close_until(
        config: &RequestRateConfig,
        key: &(String, String),
        s: &mut RateSeries,
        hour: i64,
        out: &mut Vec<Alert>,
    ) {
        if s.slots.len() != 168 {
            s.slots = vec![Ewma::default(); 168];
        }
        if hour <= s.hour {
            return;
        }
        let start = s.hour.max(hour - 168);
        let mut h = s.hour;
        while h < hour {
            let count = if h == s.hour { s.count } else { 0 };
            let slot = &mut s.slots[hour_of_week(h)];
            let m = slot.mean.max(0.0);
            let judged = slot.n >= config.min_weeks;
            let silent = judged && m >= config.silence_min_expected && (count as f64) <= m * config.silence_ratio;
            let surged = h == s.hour && s.flagged;
            if silent && !s.in_episode {
                out.push(Alert {
                    detector: DetectorKind::RequestRate,
                    service: key.0.clone(),
                    subject: key.1.clone(),
                    severity: config.severity,
                    mode: config.mode,
                    at_us: (h + 1) * HOUR_US,
                    window_start_us: h * HOUR_US,
                    window_end_us: (h + 1) * HOUR_US,
                    expected: format!("about {m:.0} requests in this hour of the week"),
                    observed: format!("{count} requests (silence)"),
                    expected_value: m,
                    observed_value: count as f64,
                    score: if m > 0.0 { count as f64 / m } else { 0.0 },
                    event_ids: s.last_event.iter().cloned().collect(),
                });
            }
            if !(silent || surged) {
                slot.update(count as f64, config.alpha);
            }
            s.in_episode = silent || surged;
            h = if h < start { start } else { h + 1 };
        }
        s.hour = hour;
        s.count = 0;
        s.cited.clear();
        s.flagged = false;
    }
}

impl Detector for RequestRate {
    fn kind(&self) -> DetectorKind {
        DetectorKind::RequestRate
    }

    fn observe(&mut self, input: &Input, out: &mut Vec<Alert>) {
        let Input::Request(r) = input else { return };
        if !self.config.enabled {
            return;
        }
        let key = (r.service.clone(), r.operation.clone().unwrap_or_else(|| NO_OPERATION.to_owned()));
        let hour = r.at_us.div_euclid(HOUR_US);
        if !self.state.series.contains_key(&key) {
            if self.state.series.len() >= self.max_series {
                self.state.dropped_inputs += 1;
                return;
            }
            let s = RateSeries { hour, slots: vec![Ewma::default(); 168], ..RateSeries::default() };
            self.state.series.insert(key.clone(), s);
        }
        let config = &self.config;
        let Some(s) = self.state.series.get_mut(&key) else { return };
        Self::close_until(config, &key, s, hour, out);
        s.count += 1;
        cite(&mut s.cited, &r.event_id, config.max_cited);
        s.last_event = Some(r.event_id.clone());
        if s.flagged || s.in_episode {
            return;
        }
        let slot = &s.slots[hour_of_week(s.hour)];
        if let Some((threshold, sd)) = Self::threshold(config, slot)
            && s.count as f64 > threshold
        {
            s.flagged = true;
            let m = slot.mean;
            out.push(Alert {
                detector: DetectorKind::RequestRate,
                service: key.0.clone(),
                subject: key.1.clone(),
                severity: config.severity,
                mode: config.mode,
                at_us: r.at_us,
                window_start_us: s.hour * HOUR_US,
                window_end_us: (s.hour + 1) * HOUR_US,
                expected: format!("about {m:.0} requests in this hour of the week (alert above {threshold:.0})"),
                observed: format!("{} requests so far in the hour (surge)", s.count),
                expected_value: m,
                observed_value: s.count as f64,
                score: (s.count as f64 - m) / sd.max(1e-9),
                event_ids: s.cited.clone(),
            });
        }
    }

    fn advance(&mut self, now_us: i64, out: &mut Vec<Alert>) {
        if !self.config.enabled {
            return;
        }
        let hour = now_us.div_euclid(HOUR_US);
        for (key, s) in &mut self.state.series {
            Self::close_until(&self.config, key, s, hour, out);
        }
    }

    fn dropped_inputs(&self) -> u64 {
        self.state.dropped_inputs
    }
}
