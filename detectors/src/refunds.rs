//! Refunds against charges per service, over rolling windows (by default 1 h and 24 h): the
//! refund-to-charge ratio of counts and of money per currency, and refunded money per currency
//! against an optional cap. Only requests Stripe answered 2xx count.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::alert::{Alert, DetectorKind};
use crate::config::{RefundsConfig, micros};
use crate::detector::Detector;
use crate::input::Input;
use crate::stats::cite;

const MINUTE_US: i64 = 60_000_000;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MinuteBucket {
    pub minute: i64,
    pub charges: u64,
    pub refunds: u64,
    pub charged: BTreeMap<String, i64>,
    pub refunded: BTreeMap<String, i64>,
    pub refund_ids: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RefundSeries {
    /// Non-empty minutes, oldest first, no older than the longest window.
    pub minutes: VecDeque<MinuteBucket>,
    /// Per window (same order as the configuration): when it last alerted, µs.
    pub last_alert_us: Vec<i64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RefundsState {
    pub series: BTreeMap<String, RefundSeries>,
    pub dropped_inputs: u64,
}

#[derive(Debug)]
pub struct Refunds {
    config: RefundsConfig,
    max_series: usize,
    pub(crate) state: RefundsState,
}

impl Refunds {
    pub fn new(config: RefundsConfig, max_series: usize, state: RefundsState) -> Self {
        Refunds { config, max_series, state }
    }
}

#[derive(Default)]
struct Sums {
    charges: u64,
    refunds: u64,
    charged: BTreeMap<String, i64>,
    refunded: BTreeMap<String, i64>,
}

impl Detector for Refunds {
    fn kind(&self) -> DetectorKind {
        DetectorKind::Refunds
    }

    fn observe(&mut self, input: &Input, out: &mut Vec<Alert>) {
        let Input::Request(r) = input else { return };
        if !self.config.enabled || !r.succeeded() {
            return;
        }
        let Some(op) = r.operation.as_deref() else { return };
        let is_charge = self.config.charge_operations.iter().any(|o| o == op);
        let is_refund = self.config.refund_operations.iter().any(|o| o == op);
        if !is_charge && !is_refund {
            return;
        }
        if !self.state.series.contains_key(&r.service) {
            if self.state.series.len() >= self.max_series {
                self.state.dropped_inputs += 1;
                return;
            }
            self.state.series.insert(r.service.clone(), RefundSeries::default());
        }
        let config = &self.config;
        let Some(s) = self.state.series.get_mut(&r.service) else { return };
        s.last_alert_us.resize(config.windows.len(), i64::MIN);
        let minute = r.at_us.div_euclid(MINUTE_US);
        let longest = config.windows.iter().map(|w| micros(w.window) / MINUTE_US).max().unwrap_or(60);
        while s.minutes.front().is_some_and(|b| b.minute <= minute - longest) {
            s.minutes.pop_front();
        }
        if s.minutes.back().is_none_or(|b| b.minute < minute) {
            s.minutes.push_back(MinuteBucket { minute, ..MinuteBucket::default() });
        }
        let Some(bucket) = s.minutes.back_mut() else { return };
        let money = r.amount.filter(|a| *a > 0).zip(r.currency.clone());
        if is_charge {
            bucket.charges += 1;
            if let Some((a, c)) = &money {
                let e = bucket.charged.entry(c.clone()).or_default();
                *e = e.saturating_add(*a);
            }
            return;
        }
        bucket.refunds += 1;
        if let Some((a, c)) = &money {
            let e = bucket.refunded.entry(c.clone()).or_default();
            *e = e.saturating_add(*a);
        }
        cite(&mut bucket.refund_ids, &r.event_id, config.max_cited);
        for (i, w) in config.windows.iter().enumerate() {
            let width = micros(w.window);
            if r.at_us.saturating_sub(s.last_alert_us[i]) < width {
                continue;
            }
            let first = minute - width / MINUTE_US + 1;
            let mut sums = Sums::default();
            let mut ids: Vec<String> = Vec::new();
            for b in s.minutes.iter().rev().take_while(|b| b.minute >= first) {
                sums.charges += b.charges;
                sums.refunds += b.refunds;
                for (c, a) in &b.charged {
                    let e = sums.charged.entry(c.clone()).or_default();
                    *e = e.saturating_add(*a);
                }
                for (c, a) in &b.refunded {
                    let e = sums.refunded.entry(c.clone()).or_default();
                    *e = e.saturating_add(*a);
                }
                for id in &b.refund_ids {
                    cite(&mut ids, id, config.max_cited);
                }
            }
            let label = humantime::format_duration(w.window).to_string();
            let mut finding: Option<(String, String, f64, f64, f64)> = None;
            if sums.refunds >= w.min_refunds {
                let ratio = sums.refunds as f64 / sums.charges.max(1) as f64;
                if ratio > w.max_count_ratio {
                    finding = Some((
                        format!("at most {:.0}% as many refunds as charges over {label}", w.max_count_ratio * 100.0),
                        format!("{} refunds for {} charges ({:.0}%)", sums.refunds, sums.charges, ratio * 100.0),
                        w.max_count_ratio,
                        ratio,
                        ratio / w.max_count_ratio,
                    ));
                }
                for (c, refunded) in &sums.refunded {
                    let charged = sums.charged.get(c).copied().unwrap_or(0);
                    let ratio = *refunded as f64 / charged.max(1) as f64;
                    if finding.is_none() && ratio > w.max_amount_ratio {
                        finding = Some((
                            format!(
                                "at most {:.0}% of the {c} charged refunded over {label}",
                                w.max_amount_ratio * 100.0
                            ),
                            format!("{refunded} {c} refunded for {charged} {c} charged (minor units)"),
                            w.max_amount_ratio,
                            ratio,
                            ratio / w.max_amount_ratio,
                        ));
                    }
                }
            }
            for (c, cap) in &w.max_refunded {
                let refunded = sums.refunded.get(c).copied().unwrap_or(0);
                if finding.is_none() && refunded > *cap {
                    finding = Some((
                        format!("at most {cap} {c} refunded over {label} (minor units)"),
                        format!("{refunded} {c} refunded"),
                        *cap as f64,
                        refunded as f64,
                        refunded as f64 / *cap as f64,
                    ));
                }
            }
            if let Some((expected, observed, ev, ov, score)) = finding {
                s.last_alert_us[i] = r.at_us;
                out.push(Alert {
                    detector: DetectorKind::Refunds,
                    service: r.service.clone(),
                    subject: format!("refunds over {label}"),
                    severity: config.severity,
                    mode: config.mode,
                    at_us: r.at_us,
                    window_start_us: first * MINUTE_US,
                    window_end_us: (minute + 1) * MINUTE_US,
                    expected,
                    observed,
                    expected_value: ev,
                    observed_value: ov,
                    score,
                    event_ids: ids,
                });
            }
        }
    }

    fn advance(&mut self, _now_us: i64, _out: &mut Vec<Alert>) {}

    fn dropped_inputs(&self) -> u64 {
        self.state.dropped_inputs
    }
}
