//! `auditlog anomalies --format html`: one self-contained page with a plot per alert.
//!
//! Each plot is inline SVG drawn from the same rows the detectors read: the series the alert is
//! about, a baseline band, and the flagged points (the records the alert cites).
//! - `amount`: every amount of the service's operation and currency (log scale) over the week
//!   before the alert; the band is where the detector's robust z stays under its threshold
//!   (`median × e^(±z·σ)`, `σ` from the quartiles of the log-amounts shown); flagged: the cited
//!   amounts.
//! - every other detector: counts per bucket (the detector's bucket: an hour, 5 minutes...) of
//!   the records it watched (the operation, the burst category, refunds, the new value, the
//!   webhook event type) over the 48 buckets before the alert and 12 after; the band is the mean
//!   ± 3 sd of the same bucket on each of the 7 days before; flagged: the buckets holding cited
//!   records.
//!
//! Invariants: no script, no stylesheet or font fetched, no external reference of any kind (the
//! page opens offline); every text from the lake is HTML-escaped; it quotes only the plaintext
//! columns `auditlog anomalies` reads (never a payload).

use std::collections::{HashMap, HashSet};
use std::fmt::Write as _;

use keygate_detectors::bursts::Category;
use keygate_detectors::{Alert, AnomaliesConfig, DetectorKind, Input};

const W: f64 = 760.0;
const H: f64 = 240.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 16.0;
const TOP: f64 = 16.0;
const BOTTOM: f64 = 36.0;
const HOUR_US: i64 = 3_600_000_000;
const DAY_US: i64 = 24 * HOUR_US;
/// Most points one amount plot draws (the flagged ones always).
const MAX_POINTS: usize = 3000;

fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// What one plot shows.
struct Plot {
    /// (x µs, y) of the series, in time order.
    series: Vec<(i64, f64)>,
    /// (x µs, low, high) of the baseline band.
    band: Vec<(i64, f64, f64)>,
    /// Flagged (x µs, y).
    flagged: Vec<(i64, f64)>,
    /// Points (amounts) rather than a line (counts).
    scatter: bool,
    log_y: bool,
    y_label: String,
}

fn matches(alert: &Alert, input: &Input, config: &AnomaliesConfig) -> bool {
    if input.service() != alert.service {
        return false;
    }
    match (alert.detector, input) {
        (DetectorKind::RequestRate, Input::Request(r)) => r.operation.as_deref() == Some(alert.subject.as_str()),
        (DetectorKind::Bursts, Input::Request(r)) => Category::of(r).is_some_and(|c| c.as_str() == alert.subject),
        (DetectorKind::Refunds, Input::Request(r)) => {
            r.operation.as_ref().is_some_and(|op| config.refunds.refund_operations.contains(op))
        }
        (DetectorKind::FirstSeen, Input::Request(r)) => {
            let (dimension, value) = alert.subject.split_once(' ').unwrap_or((alert.subject.as_str(), ""));
            match dimension {
                "connected_account" => r.stripe_account.as_deref() == Some(value),
                "currency" => r.currency.as_deref() == Some(value),
                "operation" => r.operation.as_deref() == Some(value),
                "key_mode" => r.livemode.map(|live| if live { "live" } else { "test" }) == Some(value),
                _ => true,
            }
        }
        (DetectorKind::WebhookSurge, Input::Webhook(w)) => w.event_type == alert.subject,
        _ => false,
    }
}

fn bucket_of(alert: &Alert, config: &AnomaliesConfig) -> i64 {
    let micros = |d: std::time::Duration| i64::try_from(d.as_micros()).unwrap_or(HOUR_US).max(1_000_000);
    match alert.detector {
        DetectorKind::Bursts => micros(config.bursts.bucket),
        DetectorKind::WebhookSurge => micros(config.webhook_surge.bucket),
        _ => HOUR_US,
    }
}

fn count_plot(alert: &Alert, inputs: &[Input], config: &AnomaliesConfig, cited: &HashSet<&str>) -> Plot {
    let bucket = bucket_of(alert, config);
    let first = alert.window_start_us.min(alert.at_us).div_euclid(bucket) - 48;
    let last = alert.window_end_us.max(alert.at_us).div_euclid(bucket) + 12;
    let per_day = (DAY_US / bucket).max(1);
    let from_us = (first - 7 * per_day) * bucket;
    let to_us = (last + 1) * bucket;
    let mut counts: HashMap<i64, f64> = HashMap::new();
    let mut flagged_buckets: HashSet<i64> = HashSet::new();
    for input in inputs.iter().filter(|i| (from_us..to_us).contains(&i.at_us())) {
        let b = input.at_us().div_euclid(bucket);
        if cited.contains(input.event_id()) {
            flagged_buckets.insert(b);
        }
        if matches(alert, input, config) {
            *counts.entry(b).or_default() += 1.0;
        }
    }
    let count = |b: i64| counts.get(&b).copied().unwrap_or(0.0);
    let mut plot = Plot {
        series: Vec::new(),
        band: Vec::new(),
        flagged: Vec::new(),
        scatter: false,
        log_y: false,
        y_label: format!(
            "records per {}",
            humantime::format_duration(std::time::Duration::from_micros(bucket.unsigned_abs()))
        ),
    };
    for b in first..=last {
        let x = b * bucket;
        plot.series.push((x, count(b)));
        let past: Vec<f64> = (1..=7).map(|k| count(b - k * per_day)).collect();
        let mean = past.iter().sum::<f64>() / 7.0;
        let sd = (past.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 7.0).sqrt();
        plot.band.push((x, (mean - 3.0 * sd).max(0.0), mean + 3.0 * sd));
        if flagged_buckets.contains(&b) {
            plot.flagged.push((x, count(b)));
        }
    }
    plot
}

fn amount_plot(alert: &Alert, inputs: &[Input], config: &AnomaliesConfig, cited: &HashSet<&str>) -> Plot {
    let (operation, currency) = alert.subject.rsplit_once(' ').unwrap_or((alert.subject.as_str(), ""));
    let from_us = alert.window_start_us.saturating_sub(7 * DAY_US);
    let to_us = alert.window_end_us.saturating_add(DAY_US);
    let mut points: Vec<(i64, f64, bool)> = inputs
        .iter()
        .filter_map(|i| match i {
            Input::Request(r)
                if r.service == alert.service
                    && (from_us..=to_us).contains(&r.at_us)
                    && r.operation.as_deref() == Some(operation)
                    && r.currency.as_deref() == Some(currency) =>
            {
                let amount = r.amount.filter(|a| *a > 0)?;
                Some((r.at_us, amount as f64, cited.contains(r.event_id.as_str())))
            }
            _ => None,
        })
        .collect();
    let mut logs: Vec<f64> = points.iter().filter(|p| !p.2).map(|p| p.1.ln()).collect();
    logs.sort_by(f64::total_cmp);
    let q = |f: f64| -> f64 {
        if logs.is_empty() {
            return 0.0;
        }
        let i = ((logs.len() - 1) as f64 * f).round() as usize;
        logs[i.min(logs.len() - 1)]
    };
    let (q25, median, q75) = (q(0.25), q(0.5), q(0.75));
    let sigma = ((q75 - q25) / 1.349).max(1e-9);
    let z = config.amount.z_threshold;
    let (low, high) = ((median - z * sigma).exp(), (median + z * sigma).exp());
    let stride = (points.len() / MAX_POINTS).max(1);
    let flagged: Vec<(i64, f64)> = points.iter().filter(|p| p.2).map(|p| (p.0, p.1)).collect();
    let mut i = 0usize;
    points.retain(|p| {
        i += 1;
        !p.2 && i.is_multiple_of(stride)
    });
    Plot {
        series: points.iter().map(|p| (p.0, p.1)).collect(),
        band: vec![(from_us, low, high), (to_us, low, high)],
        flagged,
        scatter: true,
        log_y: true,
        y_label: format!("amount ({currency}, minor units, log scale)"),
    }
}

fn svg(plot: &Plot, out: &mut String) {
    let xs =
        plot.series.iter().map(|p| p.0).chain(plot.band.iter().map(|b| b.0)).chain(plot.flagged.iter().map(|p| p.0));
    let (mut x0, mut x1) = (i64::MAX, i64::MIN);
    for x in xs {
        x0 = x0.min(x);
        x1 = x1.max(x);
    }
    if x0 >= x1 {
        x1 = x0.saturating_add(HOUR_US);
    }
    let ty = |v: f64| if plot.log_y { v.max(1.0).ln() } else { v };
    let ys = plot
        .series
        .iter()
        .map(|p| ty(p.1))
        .chain(plot.band.iter().flat_map(|b| [ty(b.1), ty(b.2)]))
        .chain(plot.flagged.iter().map(|p| ty(p.1)));
    let (mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY);
    for y in ys.filter(|y| y.is_finite()) {
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    if !plot.log_y {
        y0 = y0.min(0.0);
    }
    if y1 - y0 < 1e-9 {
        y1 = y0 + 1.0;
    }
    let px = |x: i64| LEFT + (x - x0) as f64 / (x1 - x0) as f64 * (W - LEFT - RIGHT);
    let py = |y: f64| TOP + (1.0 - (ty(y) - y0) / (y1 - y0)) * (H - TOP - BOTTOM);
    let _ = write!(out, r#"<svg class="plot" width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img">"#);
    let _ = write!(out, r##"<rect x="0" y="0" width="{W}" height="{H}" fill="#ffffff"/>"##);
    // The band: the low edge left to right, then the high edge back.
    if !plot.band.is_empty() {
        let mut points = String::new();
        for b in &plot.band {
            let _ = write!(points, "{:.1},{:.1} ", px(b.0), py(b.1));
        }
        for b in plot.band.iter().rev() {
            let _ = write!(points, "{:.1},{:.1} ", px(b.0), py(b.2));
        }
        let _ = write!(
            out,
            r##"<polygon class="band" points="{}" fill="#9ecae1" fill-opacity="0.5" stroke="none"/>"##,
            points.trim_end()
        );
    }
    if plot.scatter {
        for p in &plot.series {
            let _ = write!(
                out,
                r##"<circle class="point" cx="{:.1}" cy="{:.1}" r="1.6" fill="#3182bd"/>"##,
                px(p.0),
                py(p.1)
            );
        }
    } else {
        let mut points = String::new();
        for p in &plot.series {
            let _ = write!(points, "{:.1},{:.1} ", px(p.0), py(p.1));
        }
        let _ = write!(
            out,
            r##"<polyline class="series" points="{}" fill="none" stroke="#08519c" stroke-width="2"/>"##,
            points.trim_end()
        );
    }
    for p in &plot.flagged {
        let _ = write!(
            out,
            r##"<circle class="flagged" cx="{:.1}" cy="{:.1}" r="6" fill="#de2d26" stroke="#67000d" stroke-width="1.5"/>"##,
            px(p.0),
            py(p.1)
        );
    }
    // Axes and their labels.
    let (bottom, right) = (H - BOTTOM, W - RIGHT);
    let _ = write!(
        out,
        r##"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" stroke="#333"/><line x1="{LEFT}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#333"/>"##
    );
    let label = |y: f64| if plot.log_y { format!("{:.0}", y.exp()) } else { format!("{y:.0}") };
    let _ = write!(
        out,
        r##"<text x="{}" y="{}" font-size="11" text-anchor="end" fill="#333">{}</text>"##,
        LEFT - 4.0,
        TOP + 10.0,
        label(y1)
    );
    let _ = write!(
        out,
        r##"<text x="{}" y="{bottom}" font-size="11" text-anchor="end" fill="#333">{}</text>"##,
        LEFT - 4.0,
        label(y0)
    );
    let _ = write!(
        out,
        r##"<text x="{LEFT}" y="{}" font-size="11" fill="#333">{}</text>"##,
        H - 20.0,
        esc(&crate::anomalies::rfc3339(x0))
    );
    let _ = write!(
        out,
        r##"<text x="{right}" y="{}" font-size="11" text-anchor="end" fill="#333">{}</text>"##,
        H - 20.0,
        esc(&crate::anomalies::rfc3339(x1))
    );
    let _ =
        write!(out, r##"<text x="{LEFT}" y="{}" font-size="11" fill="#555">{}</text>"##, H - 6.0, esc(&plot.y_label));
    out.push_str("</svg>");
}

/// The whole page: a summary, then per alert its sentence, its plot and the records it cites.
pub fn render(alerts: &[&Alert], inputs: &[Input], config: &AnomaliesConfig, summary: &str) -> String {
    let mut out = String::new();
    out.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>keygate anomalies</title>");
    out.push_str("<style>body{font-family:sans-serif;margin:24px;color:#222;background:#fff}section.alert{border:1px solid #ccc;border-radius:6px;padding:12px;margin:16px 0}h2{font-size:16px;margin:0 0 6px}.meta{color:#555;font-size:13px}code{font-size:12px}.shadow{border-style:dashed}</style>");
    out.push_str("</head><body><h1>keygate anomalies</h1>");
    let _ = write!(out, "<p class=\"meta\">{}</p>", esc(summary));
    if alerts.is_empty() {
        out.push_str("<p>No alerts.</p>");
    }
    for alert in alerts {
        let cited: HashSet<&str> = alert.event_ids.iter().map(String::as_str).collect();
        let plot = match alert.detector {
            DetectorKind::Amount => amount_plot(alert, inputs, config, &cited),
            _ => count_plot(alert, inputs, config, &cited),
        };
        let _ = write!(
            out,
            "<section class=\"alert {mode}\" data-detector=\"{detector}\" data-service=\"{service}\"><h2>{severity} · {detector} · {service} · {subject}</h2><p class=\"meta\">{at} ({mode}); window {from} – {to}</p><p>Expected {expected}; observed {observed} (score {score:.1}).</p>",
            mode = alert.mode,
            detector = alert.detector.as_str(),
            service = esc(&alert.service),
            severity = alert.severity,
            subject = esc(&alert.subject),
            at = esc(&crate::anomalies::rfc3339(alert.at_us)),
            from = esc(&crate::anomalies::rfc3339(alert.window_start_us)),
            to = esc(&crate::anomalies::rfc3339(alert.window_end_us)),
            expected = esc(&alert.expected),
            observed = esc(&alert.observed),
            score = alert.score,
        );
        svg(&plot, &mut out);
        let ids: Vec<String> = alert.event_ids.iter().map(|id| format!("<code>{}</code>", esc(id))).collect();
        let _ = write!(
            out,
            "<p class=\"meta\">Records ({}): {}</p></section>",
            alert.event_ids.len(),
            if ids.is_empty() { "none (a silence: see the window)".to_owned() } else { ids.join(" ") }
        );
    }
    out.push_str("</body></html>\n");
    out
}
