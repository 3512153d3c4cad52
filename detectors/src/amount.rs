//! Amounts per service, operation and currency: a robust z-score of the log-amount against the
//! series' own history, kept in two rotating DDSketches (mergeable, relative-error quantiles in
//! bounded memory), so one charge 100× above normal is flagged and a busy day is not (the
//! number of charges does not move their quantiles).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sketches_ddsketch::{Config as SketchConfig, DDSketch};

use crate::alert::{Alert, DetectorKind};
use crate::config::{AmountConfig, micros};
use crate::detector::Detector;
use crate::input::Input;

/// A DDSketch (1% relative accuracy, at most 2048 bins: bounded memory whatever the range),
/// created on the first value (an empty DDSketch holds infinities, which JSON cannot carry).
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct Sketch(Option<DDSketch>);

impl Sketch {
    fn add(&mut self, v: f64) {
        self.0.get_or_insert_with(|| DDSketch::new(SketchConfig::defaults())).add(v);
    }
}

impl std::fmt::Debug for Sketch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sketch").field("count", &self.0.as_ref().map_or(0, DDSketch::count)).finish()
    }
}

impl PartialEq for Sketch {
    fn eq(&self, other: &Self) -> bool {
        serde_json::to_string(&self.0).ok() == serde_json::to_string(&other.0).ok()
    }
}

/// The baseline quartiles, recomputed every [`REFRESH_EVERY`] amounts and at each rotation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Quartiles {
    pub q25: f64,
    pub q50: f64,
    pub q75: f64,
    pub count: u64,
}

const REFRESH_EVERY: u32 = 64;
/// The least σ of the log-amount used (a series of identical amounts would otherwise make any
/// other amount infinitely far).
const MIN_SIGMA: f64 = 0.05;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AmountSeries {
    pub current: Sketch,
    pub previous: Sketch,
    /// Start of the current sketch's window, µs.
    pub epoch_start_us: i64,
    pub quartiles: Option<Quartiles>,
    pub since_refresh: u32,
}

impl AmountSeries {
    fn refresh(&mut self) {
        let merged = match (&self.previous.0, &self.current.0) {
            (Some(p), Some(c)) => {
                let mut m = p.clone();
                if m.merge(c).is_err() {
                    m = c.clone();
                }
                m
            }
            (Some(one), None) | (None, Some(one)) => one.clone(),
            (None, None) => {
                self.quartiles = None;
                self.since_refresh = 0;
                return;
            }
        };
        let q = |p: f64| merged.quantile(p).ok().flatten();
        self.quartiles = match (q(0.25), q(0.5), q(0.75)) {
            (Some(q25), Some(q50), Some(q75)) if q25 > 0.0 => {
                Some(Quartiles { q25, q50, q75, count: u64::try_from(merged.count()).unwrap_or(u64::MAX) })
            }
            _ => None,
        };
        self.since_refresh = 0;
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AmountState {
    /// Key: service, operation, currency.
    #[serde(with = "crate::stats::entries")]
    pub series: BTreeMap<(String, String, String), AmountSeries>,
    pub dropped_inputs: u64,
}

#[derive(Debug)]
pub struct Amount {
    config: AmountConfig,
    max_series: usize,
    pub(crate) state: AmountState,
}

impl Amount {
    pub fn new(config: AmountConfig, max_series: usize, state: AmountState) -> Self {
        Amount { config, max_series, state }
    }
}

impl Detector for Amount {
    fn kind(&self) -> DetectorKind {
        DetectorKind::Amount
    }

    fn observe(&mut self, input: &Input, out: &mut Vec<Alert>) {
        let Input::Request(r) = input else { return };
        let (Some(amount), Some(currency)) = (r.amount, r.currency.as_ref()) else { return };
        if !self.config.enabled || amount <= 0 || r.refusal.is_some() {
            return;
        }
        let operation = r.operation.clone().unwrap_or_else(|| crate::rate::NO_OPERATION.to_owned());
        let key = (r.service.clone(), operation, currency.clone());
        if !self.state.series.contains_key(&key) {
            if self.state.series.len() >= self.max_series {
                self.state.dropped_inputs += 1;
                return;
            }
            let s = AmountSeries { epoch_start_us: r.at_us, ..AmountSeries::default() };
            self.state.series.insert(key.clone(), s);
        }
        let config = &self.config;
        let Some(s) = self.state.series.get_mut(&key) else { return };
        let window = micros(config.window);
        if r.at_us - s.epoch_start_us >= window {
            let rotations = (r.at_us - s.epoch_start_us) / window;
            s.previous = if rotations == 1 { std::mem::take(&mut s.current) } else { Sketch::default() };
            s.current = Sketch::default();
            s.epoch_start_us += rotations * window;
            s.refresh();
        }
        let a = amount as f64;
        let mut flagged = false;
        if let Some(q) = s.quartiles
            && q.count >= config.min_samples
        {
            let sigma = ((q.q75.ln() - q.q25.ln()) / 1.349).max(MIN_SIGMA);
            let z = (a.ln() - q.q50.ln()) / sigma;
            let high = z >= config.z_threshold && a >= q.q50 * config.min_ratio;
            let low = config.flag_low && z <= -config.z_threshold && a * config.min_ratio <= q.q50;
            if high || low {
                flagged = true;
                out.push(Alert {
                    detector: DetectorKind::Amount,
                    service: key.0.clone(),
                    subject: format!("{} {}", key.1, key.2),
                    severity: config.severity,
                    mode: config.mode,
                    at_us: r.at_us,
                    window_start_us: r.at_us,
                    window_end_us: r.at_us,
                    expected: format!(
                        "a median of {:.0} {} (half of {} amounts between {:.0} and {:.0}, minor units)",
                        q.q50, key.2, q.count, q.q25, q.q75
                    ),
                    observed: format!("{amount} {} ({:.1}× the median, robust z {z:.1})", key.2, a / q.q50),
                    expected_value: q.q50,
                    observed_value: a,
                    score: z,
                    event_ids: vec![r.event_id.clone()],
                });
            }
        }
        if !flagged {
            s.current.add(a);
            s.since_refresh += 1;
            if s.quartiles.is_none_or(|q| q.count < config.min_samples) || s.since_refresh >= REFRESH_EVERY {
                s.refresh();
            }
        }
    }

    fn advance(&mut self, _now_us: i64, _out: &mut Vec<Alert>) {}

    fn dropped_inputs(&self) -> u64 {
        self.state.dropped_inputs
    }
}
