//! First sighting, per service, of a connected account, currency, operation or key mode, after
//! a learning period in which every value seen is learned silently.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::alert::{Alert, DetectorKind};
use crate::config::{Dimension, FirstSeenConfig, micros};
use crate::detector::Detector;
use crate::input::Input;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeenSeries {
    pub first_at_us: i64,
    /// Per dimension (its `as_str`), the values seen.
    pub values: BTreeMap<String, BTreeSet<String>>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FirstSeenState {
    pub series: BTreeMap<String, SeenSeries>,
    pub dropped_inputs: u64,
}

#[derive(Debug)]
pub struct FirstSeen {
    config: FirstSeenConfig,
    max_series: usize,
    pub(crate) state: FirstSeenState,
}

impl FirstSeen {
    pub fn new(config: FirstSeenConfig, max_series: usize, state: FirstSeenState) -> Self {
        FirstSeen { config, max_series, state }
    }
}

impl Detector for FirstSeen {
    fn kind(&self) -> DetectorKind {
        DetectorKind::FirstSeen
    }

    fn observe(&mut self, input: &Input, out: &mut Vec<Alert>) {
        let Input::Request(r) = input else { return };
        if !self.config.enabled {
            return;
        }
        if !self.state.series.contains_key(&r.service) {
            if self.state.series.len() >= self.max_series {
                self.state.dropped_inputs += 1;
                return;
            }
            self.state.series.insert(r.service.clone(), SeenSeries { first_at_us: r.at_us, ..SeenSeries::default() });
        }
        let config = &self.config;
        let Some(s) = self.state.series.get_mut(&r.service) else { return };
        let learning = r.at_us.saturating_sub(s.first_at_us) < micros(config.learn_for);
        for dimension in &config.dimensions {
            let value = match dimension {
                Dimension::ConnectedAccount => r.stripe_account.clone(),
                Dimension::Currency => r.currency.clone(),
                Dimension::Operation => r.operation.clone(),
                Dimension::KeyMode => r.livemode.map(|live| if live { "live" } else { "test" }.to_owned()),
            };
            let Some(value) = value else { continue };
            let seen = s.values.entry(dimension.as_str().to_owned()).or_default();
            if seen.contains(&value) || seen.len() >= config.max_values {
                continue;
            }
            let count = seen.len();
            seen.insert(value.clone());
            if learning {
                continue;
            }
            out.push(Alert {
                detector: DetectorKind::FirstSeen,
                service: r.service.clone(),
                subject: format!("{} {value}", dimension.as_str()),
                severity: config.severity,
                mode: config.mode,
                at_us: r.at_us,
                window_start_us: r.at_us,
                window_end_us: r.at_us,
                expected: format!("one of the {count} {} values this service has used", dimension.as_str()),
                observed: format!("first use of {} {value}", dimension.as_str()),
                expected_value: count as f64,
                observed_value: count as f64 + 1.0,
                score: 1.0,
                event_ids: vec![r.event_id.clone()],
            });
        }
    }

    fn advance(&mut self, _now_us: i64, _out: &mut Vec<Alert>) {}

    fn dropped_inputs(&self) -> u64 {
        self.state.dropped_inputs
    }
}
