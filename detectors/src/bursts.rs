//! Bursts per service of four kinds of failure, in fixed buckets (5 minutes by default), each
//! judged against its learned share of the service's traffic, so a busy hour with the usual
//! share of declines is not a burst and a card-testing run is.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::alert::{Alert, DetectorKind};
use crate::config::{BurstsConfig, micros};
use crate::detector::Detector;
use crate::input::{Input, RequestInput};
use crate::stats::{Ewma, bucket_of, cite};

/// The kinds of failure counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    /// Stripe answered 402 (card declined and the like).
    Declines,
    /// Stripe answered another 4xx.
    ClientErrors,
    /// Stripe answered 5xx, or could not be reached.
    Stripe5xx,
    /// keygate refused (policy denial, rate limit, budget, bad request).
    Refusals,
}

impl Category {
    pub const ALL: [Category; 4] =
        [Category::Declines, Category::ClientErrors, Category::Stripe5xx, Category::Refusals];

    pub fn as_str(self) -> &'static str {
        match self {
            Category::Declines => "declines",
            Category::ClientErrors => "client_errors",
            Category::Stripe5xx => "stripe_5xx",
            Category::Refusals => "refusals",
        }
    }

    pub fn of(r: &RequestInput) -> Option<Category> {
        if r.refusal.is_some() {
            Some(Category::Refusals)
        } else if r.upstream_error || r.status >= 500 {
            Some(Category::Stripe5xx)
        } else if r.status == 402 {
            Some(Category::Declines)
        } else if (400..500).contains(&r.status) {
            Some(Category::ClientErrors)
        } else {
            None
        }
    }

    fn index(self) -> usize {
        match self {
            Category::Declines => 0,
            Category::ClientErrors => 1,
            Category::Stripe5xx => 2,
            Category::Refusals => 3,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BurstSeries {
    pub bucket: i64,
    pub total: u64,
    pub counts: [u64; 4],
    pub cited: [Vec<String>; 4],
    pub flagged: [bool; 4],
    pub in_episode: [bool; 4],
    /// Learned requests per bucket, and per category.
    pub base_total: Ewma,
    pub base: [Ewma; 4],
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BurstsState {
    pub series: BTreeMap<String, BurstSeries>,
    pub dropped_inputs: u64,
}

#[derive(Debug)]
pub struct Bursts {
    config: BurstsConfig,
    max_series: usize,
    pub(crate) state: BurstsState,
}

impl Bursts {
    pub fn new(config: BurstsConfig, max_series: usize, state: BurstsState) -> Self {
        Bursts { config, max_series, state }
    }

    fn close_until(config: &BurstsConfig, s: &mut BurstSeries, bucket: i64) {
        if bucket <= s.bucket {
            return;
        }
        // Only buckets with traffic teach the share; idle buckets (nights) say nothing about it.
        if s.total > 0 {
            s.base_total.update(s.total as f64, config.alpha);
            for i in 0..4 {
                if !s.flagged[i] {
                    s.base[i].update(s.counts[i] as f64, config.alpha);
                }
                s.in_episode[i] = s.flagged[i];
            }
        } else {
            s.in_episode = [false; 4];
        }
        s.bucket = bucket;
        s.total = 0;
        s.counts = [0; 4];
        s.cited = Default::default();
        s.flagged = [false; 4];
    }
}

impl Detector for Bursts {
    fn kind(&self) -> DetectorKind {
        DetectorKind::Bursts
    }

    fn observe(&mut self, input: &Input, out: &mut Vec<Alert>) {
        let Input::Request(r) = input else { return };
        if !self.config.enabled {
            return;
        }
        let width = micros(self.config.bucket);
        let bucket = bucket_of(r.at_us, width);
        if !self.state.series.contains_key(&r.service) {
            if self.state.series.len() >= self.max_series {
                self.state.dropped_inputs += 1;
                return;
            }
            self.state.series.insert(r.service.clone(), BurstSeries { bucket, ..BurstSeries::default() });
        }
        let config = &self.config;
        let Some(s) = self.state.series.get_mut(&r.service) else { return };
        Self::close_until(config, s, bucket);
        s.total += 1;
        let Some(category) = Category::of(r) else { return };
        let i = category.index();
        s.counts[i] += 1;
        cite(&mut s.cited[i], &r.event_id, config.max_cited);
        if s.flagged[i] || s.in_episode[i] || s.base_total.n < config.min_buckets {
            return;
        }
        let share = (s.base[i].mean / s.base_total.mean.max(1.0)).clamp(config.min_share, 1.0);
        let expected = s.total as f64 * share;
        let threshold = (config.min_count as f64)
            .max(expected * config.min_ratio)
            .max(expected + config.sigmas * (expected + 1.0).sqrt());
        let count = s.counts[i] as f64;
        if count >= threshold {
            s.flagged[i] = true;
            out.push(Alert {
                detector: DetectorKind::Bursts,
                service: r.service.clone(),
                subject: category.as_str().to_owned(),
                severity: config.severity,
                mode: config.mode,
                at_us: r.at_us,
                window_start_us: s.bucket * width,
                window_end_us: (s.bucket + 1) * width,
                expected: format!(
                    "about {expected:.1} {} among {} requests ({:.2}% of traffic; alert at {threshold:.0})",
                    category.as_str(),
                    s.total,
                    share * 100.0
                ),
                observed: format!(
                    "{} {} in {}",
                    s.counts[i],
                    category.as_str(),
                    humantime::format_duration(config.bucket)
                ),
                expected_value: expected,
                observed_value: count,
                score: (count - expected) / (expected + 1.0).sqrt(),
                event_ids: s.cited[i].clone(),
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
