//! A realistic, seeded history generator: multi-week traffic of a few services with daily and
//! weekly seasonality, day-to-day and hour-to-hour noise, several currencies, connected
//! accounts, the usual share of declines, client errors, Stripe 5xx and refusals, webhook
//! events, and planted anomalies of every kind whose event ids are known.
//!
//! It lives in this crate (not in `tests/src/`) so that the detectors' own unit tests can
//! measure precision and recall without building the proxy or the lake, and so that the
//! end-to-end tests (writing the same history into a lake through keygate's audit writer, or
//! sending it through keygate as live traffic) reuse the one generator. It is deterministic:
//! the same [`HistoryConfig`] gives the same history.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::alert::DetectorKind;
use crate::input::{Input, RequestInput, WebhookInput};
use crate::stats::HOUR_US;

/// 2026-01-05 00:00:00 UTC, a Monday.
pub const DEFAULT_START_US: i64 = 1_767_571_200_000_000;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryConfig {
    pub seed: u64,
    /// Whole weeks of history (at least 5 when anomalies are planted: they go in weeks 4 and 5).
    pub weeks: u32,
    /// A Monday 00:00 UTC, µs.
    pub start_us: i64,
    /// Multiplies every rate (1.0: the checkout service peaks at about 300 requests an hour).
    pub scale: f64,
    pub plant: bool,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        HistoryConfig { seed: 18, weeks: 5, start_us: DEFAULT_START_US, scale: 1.0, plant: true }
    }
}

/// One planted anomaly and what should find it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Planted {
    /// A short name, e.g. `rate_surge`.
    pub name: String,
    pub detector: DetectorKind,
    pub service: String,
    /// The alert subject expected (an operation, a category, `currency brl`...).
    pub subject: String,
    pub window_start_us: i64,
    pub window_end_us: i64,
    /// The planted records (empty for a silence: its records are the ones removed).
    pub event_ids: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct History {
    /// Every input, in time order.
    pub inputs: Vec<Input>,
    pub planted: Vec<Planted>,
    pub start_us: i64,
    pub end_us: i64,
}

struct OpSpec {
    service: &'static str,
    operation: &'static str,
    /// Requests per hour at the daily peak on a weekday.
    peak: f64,
    /// Currencies with their weight and median amount (minor units); empty: no amount.
    money: &'static [(&'static str, f64, f64)],
    accounts: usize,
    /// Share of 402 / other 4xx / 5xx / refusals.
    errors: [f64; 4],
}

const OPS: &[OpSpec] = &[
    OpSpec {
        service: "checkout",
        operation: "POST /v1/payment_intents",
        peak: 200.0,
        money: &[("usd", 0.7, 4500.0), ("eur", 0.3, 3800.0)],
        accounts: 0,
        errors: [0.03, 0.01, 0.001, 0.003],
    },
    OpSpec {
        service: "checkout",
        operation: "GET /v1/payment_intents/{intent}",
        peak: 100.0,
        money: &[],
        accounts: 0,
        errors: [0.0, 0.005, 0.001, 0.001],
    },
    OpSpec {
        service: "checkout",
        operation: "POST /v1/refunds",
        peak: 6.0,
        money: &[("usd", 0.7, 4500.0), ("eur", 0.3, 3800.0)],
        accounts: 0,
        errors: [0.0, 0.01, 0.001, 0.0],
    },
    OpSpec {
        service: "billing",
        operation: "POST /v1/invoices",
        peak: 80.0,
        money: &[],
        accounts: 0,
        errors: [0.0, 0.01, 0.001, 0.002],
    },
    OpSpec {
        service: "billing",
        operation: "POST /v1/subscriptions",
        peak: 30.0,
        money: &[],
        accounts: 0,
        errors: [0.02, 0.01, 0.001, 0.002],
    },
    OpSpec {
        service: "billing",
        operation: "POST /v1/charges",
        peak: 20.0,
        money: &[("usd", 0.6, 2000.0), ("gbp", 0.4, 1800.0)],
        accounts: 0,
        errors: [0.03, 0.01, 0.001, 0.002],
    },
    OpSpec {
        service: "payouts",
        operation: "POST /v1/transfers",
        peak: 40.0,
        money: &[("usd", 1.0, 50_000.0)],
        accounts: 15,
        errors: [0.0, 0.01, 0.002, 0.002],
    },
    OpSpec {
        service: "payouts",
        operation: "GET /v1/balance",
        peak: 12.0,
        money: &[],
        accounts: 15,
        errors: [0.0, 0.0, 0.002, 0.0],
    },
];

/// Webhook event types per endpoint, per hour at the peak.
const WEBHOOKS: &[(&str, &str, f64)] = &[
    ("checkout", "charge.dispute.created", 0.4),
    ("checkout", "radar.early_fraud_warning.created", 0.3),
    ("checkout", "charge.succeeded", 150.0),
    ("billing", "invoice.payment_failed", 3.0),
    ("payouts", "payout.failed", 0.2),
];

struct Gen {
    rng: StdRng,
    inputs: Vec<Input>,
}

impl Gen {
    fn uniform(&mut self) -> f64 {
        self.rng.random::<f64>()
    }

    fn normal(&mut self) -> f64 {
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    fn poisson(&mut self, lambda: f64) -> u64 {
        if lambda <= 0.0 {
            return 0;
        }
        if lambda < 30.0 {
            let l = (-lambda).exp();
            let (mut k, mut p) = (0u64, 1.0);
            loop {
                p *= self.uniform();
                if p <= l {
                    return k;
                }
                k += 1;
            }
        }
        (lambda + lambda.sqrt() * self.normal()).round().max(0.0) as u64
    }

    /// A UUIDv7-shaped id for a record at `at_us`.
    fn event_id(&mut self, at_us: i64) -> String {
        let ms = u64::try_from(at_us / 1000).unwrap_or(0) & 0xffff_ffff_ffff;
        let a: u16 = self.rng.random::<u16>() & 0x0fff;
        let b: u16 = (self.rng.random::<u16>() & 0x3fff) | 0x8000;
        let c: u64 = self.rng.random::<u64>() & 0xffff_ffff_ffff;
        format!("{:08x}-{:04x}-7{:03x}-{:04x}-{:012x}", ms >> 16, ms & 0xffff, a, b, c)
    }

    fn at_in(&mut self, start_us: i64, width_us: i64) -> i64 {
        start_us + (self.uniform() * width_us as f64) as i64
    }

    #[allow(clippy::too_many_arguments)]
    fn request(
        &mut self,
        service: &str,
        operation: &str,
        at_us: i64,
        status: u16,
        refusal: Option<&str>,
        money: Option<(i64, &str)>,
        account: Option<String>,
        live: bool,
    ) -> String {
        let event_id = self.event_id(at_us);
        self.inputs.push(Input::Request(RequestInput {
            event_id: event_id.clone(),
            at_us,
            service: service.to_owned(),
            operation: Some(operation.to_owned()),
            status,
            refusal: refusal.map(str::to_owned),
            upstream_error: false,
            amount: money.map(|m| m.0),
            currency: money.map(|m| m.1.to_owned()),
            stripe_account: account,
            livemode: Some(live),
        }));
        event_id
    }

    fn amount(&mut self, median: f64) -> i64 {
        (median * (0.8 * self.normal()).exp()).round().max(50.0) as i64
    }

    fn pick_money(&mut self, money: &'static [(&'static str, f64, f64)]) -> Option<(i64, &'static str)> {
        if money.is_empty() {
            return None;
        }
        let mut u = self.uniform();
        for (currency, weight, median) in money {
            if u < *weight {
                let a = self.amount(*median);
                return Some((a, currency));
            }
            u -= weight;
        }
        let (currency, _, median) = money[money.len() - 1];
        let a = self.amount(median);
        Some((a, currency))
    }

    fn status(&mut self, errors: [f64; 4]) -> (u16, Option<&'static str>) {
        let u = self.uniform();
        let mut edge = errors[0];
        if u < edge {
            return (402, None);
        }
        edge += errors[1];
        if u < edge {
            return (400, None);
        }
        edge += errors[2];
        if u < edge {
            return (500, None);
        }
        edge += errors[3];
        if u < edge {
            return (403, Some("keygate_policy_denied"));
        }
        (200, None)
    }
}

/// The daily shape (UTC hour) and the weekend dip.
fn season(hour_index: i64) -> f64 {
    let hour = hour_index.rem_euclid(24) as f64;
    let day = (hour_index.div_euclid(24) + 3).rem_euclid(7); // 0 = Monday
    let daily = 0.15 + 0.85 * (-(hour - 14.0).powi(2) / (2.0 * 16.0)).exp();
    daily * if day >= 5 { 0.5 } else { 1.0 }
}

/// The start of `weeks` whole weeks of history that end at the last Monday 00:00 UTC at or before
/// `now_us`. Planted anomalies then fall on the weekdays and UTC hours they are described by
/// (the silence on a Wednesday 11:00–14:00, when billing's traffic is high enough to judge a
/// silence), whatever the time of day a test runs: a history ending at the last full hour put the
/// silence at night for runs in the evening (UTC), where it is too quiet to be judged.
pub fn start_before_last_monday(now_us: i64, weeks: u32) -> i64 {
    let day_us = 24 * HOUR_US;
    let days = now_us.div_euclid(day_us);
    // Day 0 of the epoch was a Thursday: (days + 3) mod 7 is 0 on Mondays.
    let monday = days - (days + 3).rem_euclid(7);
    monday * day_us - i64::from(weeks) * 7 * day_us
}

/// Generates the history.
pub fn generate(config: &HistoryConfig) -> History {
    let mut g = Gen { rng: StdRng::seed_from_u64(config.seed), inputs: Vec::new() };
    let start_hour = config.start_us.div_euclid(HOUR_US);
    let hours = i64::from(config.weeks) * 168;
    let day_us = 24 * HOUR_US;
    let at = |week: i64, day: i64, hour: i64, minute: i64| {
        config.start_us + week * 7 * day_us + day * day_us + hour * HOUR_US + minute * 60_000_000
    };
    // The silence: billing's invoices stop for three hours (Wednesday of week 4, 11:00–14:00).
    let silence = (at(3, 2, 11, 0), at(3, 2, 14, 0));
    let mut day_factor = vec![1.0; OPS.len() + WEBHOOKS.len()];
    for h in 0..hours {
        let hour_index = start_hour + h;
        if h % 24 == 0 {
            for f in &mut day_factor {
                *f = (0.1 * g.normal()).exp();
            }
        }
        let hour_start = hour_index * HOUR_US;
        for (i, op) in OPS.iter().enumerate() {
            let noise = (0.05 * g.normal()).exp();
            let n = g.poisson(op.peak * config.scale * season(hour_index) * day_factor[i] * noise);
            for _ in 0..n {
                let t = g.at_in(hour_start, HOUR_US);
                if config.plant && op.operation == "POST /v1/invoices" && t >= silence.0 && t < silence.1 {
                    continue;
                }
                let (status, refusal) = g.status(op.errors);
                let money = g.pick_money(op.money);
                let account = (op.accounts > 0).then(|| format!("acct_{:04}", g.rng.random_range(0..op.accounts)));
                g.request(op.service, op.operation, t, status, refusal, money, account, true);
            }
        }
        for (j, (service, event_type, peak)) in WEBHOOKS.iter().enumerate() {
            let n = g.poisson(peak * config.scale * season(hour_index) * day_factor[OPS.len() + j]);
            for _ in 0..n {
                let t = g.at_in(hour_start, HOUR_US);
                let event_id = format!("evt_{}", g.event_id(t).replace('-', ""));
                g.inputs.push(Input::Webhook(WebhookInput {
                    event_id,
                    at_us: t,
                    service: (*service).to_owned(),
                    event_type: (*event_type).to_owned(),
                    livemode: Some(true),
                }));
            }
        }
    }
    let mut planted = Vec::new();
    if config.plant && config.weeks >= 5 {
        plant(&mut g, &at, silence, config.scale, &mut planted);
    }
    let mut inputs = g.inputs;
    inputs.sort_by_key(Input::at_us);
    History { inputs, planted, start_us: config.start_us, end_us: config.start_us + hours * HOUR_US }
}

fn plant(
    g: &mut Gen,
    at: &dyn Fn(i64, i64, i64, i64) -> i64,
    silence: (i64, i64),
    scale: f64,
    planted: &mut Vec<Planted>,
) {
    let mut add = |name: &str, detector, service: &str, subject: &str, window: (i64, i64), ids: Vec<String>| {
        planted.push(Planted {
            name: name.to_owned(),
            detector,
            service: service.to_owned(),
            subject: subject.to_owned(),
            window_start_us: window.0,
            window_end_us: window.1,
            event_ids: ids,
        });
    };
    let pi = "POST /v1/payment_intents";
    // 1. A retry loop: five times checkout's usual payment intents in one hour (Tuesday 15:00).
    let start = at(3, 1, 15, 0);
    let n = (800.0 * scale).round().max(60.0) as usize;
    let ids = (0..n)
        .map(|_| {
            let t = g.at_in(start, HOUR_US);
            let m = g.amount(4500.0);
            g.request("checkout", pi, t, 200, None, Some((m, "usd")), None, true)
        })
        .collect();
    add("rate_surge", DetectorKind::RequestRate, "checkout", pi, (start, start + HOUR_US), ids);
    // 2. The silence (its records were left out above).
    add("rate_silence", DetectorKind::RequestRate, "billing", "POST /v1/invoices", silence, Vec::new());
    // 3. A pricing bug: one charge 150× the median.
    let t = at(3, 3, 10, 23);
    let id = g.request("checkout", pi, t, 200, None, Some((675_000, "usd")), None, true);
    add("amount_100x", DetectorKind::Amount, "checkout", &format!("{pi} usd"), (t, t), vec![id]);
    // 4. A refund wave: 150 refunds in half an hour (Friday 16:00).
    let start = at(3, 4, 16, 0);
    let ids = (0..150)
        .map(|_| {
            let t = g.at_in(start, HOUR_US / 2);
            let m = g.amount(4500.0);
            g.request("checkout", "POST /v1/refunds", t, 200, None, Some((m, "usd")), None, true)
        })
        .collect();
    add("refund_wave", DetectorKind::Refunds, "checkout", "refunds over 1h", (start, start + HOUR_US / 2), ids);
    // 5. Card testing at night: 60 declined small payment intents in 4 minutes (Saturday 03:00).
    let start = at(3, 5, 3, 0);
    let ids = (0..60)
        .map(|_| {
            let t = g.at_in(start, 4 * 60_000_000);
            g.request("checkout", pi, t, 402, None, Some((100, "usd")), None, true)
        })
        .collect();
    add("decline_burst", DetectorKind::Bursts, "checkout", "declines", (start, start + 4 * 60_000_000), ids);
    // 6. A runaway client hitting its rate limit: 50 refusals in 3 minutes (Monday 09:00).
    let start = at(4, 0, 9, 0);
    let ids = (0..50)
        .map(|_| {
            let t = g.at_in(start, 3 * 60_000_000);
            g.request("billing", "POST /v1/invoices", t, 429, Some("keygate_rate_limited"), None, None, true)
        })
        .collect();
    add("refusal_burst", DetectorKind::Bursts, "billing", "refusals", (start, start + 3 * 60_000_000), ids);
    // 7. A Stripe incident: 40 transfers answered 500 in 4 minutes (Tuesday 13:00).
    let start = at(4, 1, 13, 0);
    let ids = (0..40)
        .map(|i| {
            let t = g.at_in(start, 4 * 60_000_000);
            let m = g.amount(50_000.0);
            g.request(
                "payouts",
                "POST /v1/transfers",
                t,
                500,
                None,
                Some((m, "usd")),
                Some(format!("acct_{:04}", i % 15)),
                true,
            )
        })
        .collect();
    add("stripe_5xx_burst", DetectorKind::Bursts, "payouts", "stripe_5xx", (start, start + 4 * 60_000_000), ids);
    // 8. A bad deploy: 40 subscriptions refused by Stripe with 400 in 4 minutes (Wednesday 10:00).
    let start = at(4, 2, 10, 0);
    let ids = (0..40)
        .map(|_| {
            let t = g.at_in(start, 4 * 60_000_000);
            g.request("billing", "POST /v1/subscriptions", t, 400, None, None, None, true)
        })
        .collect();
    add("client_error_burst", DetectorKind::Bursts, "billing", "client_errors", (start, start + 4 * 60_000_000), ids);
    // 9. First sightings: a connected account, a currency, a key mode, an operation.
    let t = at(4, 3, 12, 7);
    let id = g.request(
        "payouts",
        "POST /v1/transfers",
        t,
        200,
        None,
        Some((40_000, "usd")),
        Some("acct_planted".into()),
        true,
    );
    add("new_account", DetectorKind::FirstSeen, "payouts", "connected_account acct_planted", (t, t), vec![id]);
    let t = at(4, 3, 14, 11);
    let id = g.request("checkout", pi, t, 200, None, Some((20_000, "brl")), None, true);
    add("new_currency", DetectorKind::FirstSeen, "checkout", "currency brl", (t, t), vec![id]);
    let t = at(4, 4, 9, 31);
    let id = g.request("billing", "POST /v1/invoices", t, 200, None, None, None, false);
    add("new_key_mode", DetectorKind::FirstSeen, "billing", "key_mode test", (t, t), vec![id]);
    let t = at(4, 4, 11, 2);
    let op = "POST /v1/customers/{customer}/sources";
    let id = g.request("checkout", op, t, 200, None, None, None, true);
    add("new_operation", DetectorKind::FirstSeen, "checkout", &format!("operation {op}"), (t, t), vec![id]);
    // 10. A dispute wave: 30 disputes in one hour (Saturday 20:00).
    let start = at(4, 5, 20, 0);
    let ids = (0..30)
        .map(|_| {
            let t = g.at_in(start, HOUR_US);
            let event_id = format!("evt_{}", g.event_id(t).replace('-', ""));
            g.inputs.push(Input::Webhook(WebhookInput {
                event_id: event_id.clone(),
                at_us: t,
                service: "checkout".into(),
                event_type: "charge.dispute.created".into(),
                livemode: Some(true),
            }));
            event_id
        })
        .collect();
    add(
        "dispute_surge",
        DetectorKind::WebhookSurge,
        "checkout",
        "charge.dispute.created",
        (start, start + HOUR_US),
        ids,
    );
}

/// How a run of the detectors over a [`History`] did against its planted anomalies.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// Each planted anomaly's name and whether an alert of the right detector, service and
    /// subject, over its window, citing at least one of its records (when it has records),
    /// found it.
    pub found: Vec<(String, bool)>,
    /// Alerts that no planted anomaly explains: neither citing a planted record nor overlapping,
    /// for the same service, a planted window widened by an hour each side.
    pub unexplained: Vec<crate::Alert>,
    pub alerts: usize,
    /// found / planted.
    pub recall: f64,
    /// explained alerts / alerts (1.0 when there are none).
    pub precision: f64,
    /// The most unexplained alerts of one service on one UTC day.
    pub max_unexplained_per_service_day: usize,
    pub service_days: usize,
}

/// Matches `alerts` (in any mode) against `history`'s planted anomalies.
pub fn evaluate(history: &History, alerts: &[crate::Alert]) -> Evaluation {
    let overlaps = |a: &crate::Alert, start: i64, end: i64| a.window_start_us <= end && a.window_end_us >= start;
    let cites =
        |a: &crate::Alert, p: &Planted| p.event_ids.is_empty() || a.event_ids.iter().any(|id| p.event_ids.contains(id));
    let found: Vec<(String, bool)> = history
        .planted
        .iter()
        .map(|p| {
            let hit = alerts.iter().any(|a| {
                a.detector == p.detector
                    && a.service == p.service
                    && a.subject == p.subject
                    && overlaps(a, p.window_start_us, p.window_end_us)
                    && cites(a, p)
            });
            (p.name.clone(), hit)
        })
        .collect();
    let unexplained: Vec<crate::Alert> = alerts
        .iter()
        .filter(|a| {
            !history.planted.iter().any(|p| {
                (a.service == p.service && overlaps(a, p.window_start_us - HOUR_US, p.window_end_us + HOUR_US))
                    || a.event_ids.iter().any(|id| p.event_ids.contains(id))
            })
        })
        .cloned()
        .collect();
    let mut per_day: std::collections::BTreeMap<(String, i64), usize> = std::collections::BTreeMap::new();
    for a in &unexplained {
        *per_day.entry((a.service.clone(), a.at_us.div_euclid(24 * HOUR_US))).or_default() += 1;
    }
    let services: std::collections::BTreeSet<&str> = history.inputs.iter().map(Input::service).collect();
    let days = usize::try_from((history.end_us - history.start_us).div_euclid(24 * HOUR_US)).unwrap_or(0);
    let hits = found.iter().filter(|f| f.1).count();
    Evaluation {
        recall: if found.is_empty() { 1.0 } else { hits as f64 / found.len() as f64 },
        precision: if alerts.is_empty() {
            1.0
        } else {
            (alerts.len() - unexplained.len()) as f64 / alerts.len() as f64
        },
        max_unexplained_per_service_day: per_day.values().copied().max().unwrap_or(0),
        service_days: services.len() * days,
        found,
        alerts: alerts.len(),
        unexplained,
    }
}

/// Runs a fresh engine over a history and closes its last hour; returns every alert.
pub fn run(config: &crate::AnomaliesConfig, history: &History) -> Vec<crate::Alert> {
    let mut engine = crate::Engine::new(config);
    let mut alerts = Vec::new();
    for input in &history.inputs {
        alerts.extend(engine.observe(input));
    }
    alerts.extend(engine.advance(history.end_us));
    alerts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histories_end_on_the_last_monday_at_midnight_utc() {
        let week = 7 * 24 * HOUR_US;
        // 2026-12-02T18:25:00Z, a Wednesday; its last Monday 00:00 is 2026-11-30.
        let wednesday = 1_796_235_900_000_000;
        let monday_2026_11_30 = 1_795_996_800_000_000;
        assert_eq!(start_before_last_monday(wednesday, 5), monday_2026_11_30 - 5 * week);
        // A Monday at midnight is its own last Monday; a microsecond before, the week before's.
        assert_eq!(start_before_last_monday(monday_2026_11_30, 0), monday_2026_11_30);
        assert_eq!(start_before_last_monday(monday_2026_11_30 - 1, 0), monday_2026_11_30 - week);
        // Every start is a Monday (day index 0 of `season`).
        let start = start_before_last_monday(wednesday, 5);
        assert_eq!(start.rem_euclid(24 * HOUR_US), 0);
        assert_eq!((start.div_euclid(24 * HOUR_US) + 3).rem_euclid(7), 0);
    }

    #[test]
    fn every_planted_anomaly_is_found_and_clean_history_stays_quiet() {
        let history = generate(&HistoryConfig::default());
        assert!(history.inputs.len() > 100_000, "{} inputs", history.inputs.len());
        let alerts = run(&crate::AnomaliesConfig::default(), &history);
        let e = evaluate(&history, &alerts);
        for a in &e.unexplained {
            eprintln!("unexplained: {}", a.summary());
        }
        eprintln!(
            "{} inputs, {} alerts, recall {:.2}, precision {:.2}, {} unexplained over {} service-days (at most {} on one)",
            history.inputs.len(),
            e.alerts,
            e.recall,
            e.precision,
            e.unexplained.len(),
            e.service_days,
            e.max_unexplained_per_service_day
        );
        let missed: Vec<&String> = e.found.iter().filter(|f| !f.1).map(|f| &f.0).collect();
        assert!(missed.is_empty(), "missed planted anomalies: {missed:?}");
        // The bounds docs/anomalies.md states.
        assert!(e.max_unexplained_per_service_day <= 1, "{e:?}");
        assert!(e.unexplained.len() * 10 <= e.service_days, "{} unexplained", e.unexplained.len());
    }

    #[test]
    fn a_clean_history_raises_almost_nothing() {
        let history = generate(&HistoryConfig { seed: 7, plant: false, ..HistoryConfig::default() });
        let alerts = run(&crate::AnomaliesConfig::default(), &history);
        let e = evaluate(&history, &alerts);
        for a in &alerts {
            eprintln!("clean-history alert: {}", a.summary());
        }
        assert!(
            e.max_unexplained_per_service_day <= 1 && alerts.len() * 10 <= e.service_days,
            "{} alerts",
            alerts.len()
        );
    }

    #[test]
    fn the_generator_is_deterministic() {
        let config = HistoryConfig { weeks: 1, plant: false, scale: 0.2, ..HistoryConfig::default() };
        assert_eq!(generate(&config).inputs, generate(&config).inputs);
    }
}
