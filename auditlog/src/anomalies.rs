//! `auditlog anomalies`: keygate's anomaly detectors (keygate-detectors) run in batch over the
//! lake's plaintext columns, to report past anomalies and to bootstrap the baselines of a new
//! instance (`--save-state`).
//!
//! Invariants: reads only plaintext columns (never a payload, so it needs no key-encryption
//! key); feeds the detectors in `completed_at` order (webhook events by `received_at`), exactly
//! as the live path would; the output quotes only those columns' values and counts.

use std::path::{Path, PathBuf};

use arrow::array::{Array, BooleanArray, Int64Array, RecordBatch, StringArray};
use futures::StreamExt;
use keygate_auditlog::lake::Lake;
use keygate_auditlog::query::session;
use keygate_detectors::input::UNAUTHENTICATED;
use keygate_detectors::{Alert, AnomaliesConfig, Engine, Input, Mode, RequestInput, WebhookInput, refusal_of};

use crate::{CliError, out_line};

#[path = "anomalies_html.rs"]
mod html;

/// How `auditlog anomalies` prints its alerts.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AnomalyFormat {
    Table,
    Jsonl,
    /// One self-contained page with a plot per alert (docs/anomalies.md).
    Html,
}

#[derive(Debug)]
pub struct Options {
    pub since_us: i64,
    /// The end of the window (exclusive; `None`: now).
    pub until_us: Option<i64>,
    pub services: Vec<String>,
    pub format: AnomalyFormat,
    pub save_state: Option<PathBuf>,
    /// Print shadow-mode alerts too (marked `shadow`).
    pub include_shadow: bool,
}

fn usage(e: impl std::fmt::Display) -> CliError {
    CliError::Usage(e.to_string())
}

/// The `anomalies` section of a keygate config file (defaults without one), validated.
pub fn config_from(path: Option<&Path>) -> Result<AnomaliesConfig, CliError> {
    let config = match path {
        None => AnomaliesConfig::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| usage(format!("cannot read --config {}: {e}", path.display())))?;
            let value: serde_json::Value = if text.trim().is_empty() {
                serde_json::Value::Null
            } else {
                serde_saphyr::from_str(&text)
                    .map_err(|e| usage(format!("--config {} is not valid YAML: {e}", path.display())))?
            };
            match value.get("anomalies") {
                None | Some(serde_json::Value::Null) => AnomaliesConfig::default(),
                Some(section) => serde_json::from_value(section.clone())
                    .map_err(|e| usage(format!("--config {}: anomalies section: {e}", path.display())))?,
            }
        }
    };
    config.validate().map_err(usage)?;
    Ok(config)
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

fn date_of(us: i64) -> String {
    match time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000) {
        Ok(t) => format!("{:04}-{:02}-{:02}", t.year(), u8::from(t.month()), t.day()),
        Err(_) => "1970-01-01".into(),
    }
}

pub(crate) fn rfc3339(us: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(us) * 1000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| us.to_string())
}

fn strings<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a StringArray, CliError> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<StringArray>())
        .ok_or_else(|| usage(format!("the lake's result has no text column {name}")))
}

fn ints<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a Int64Array, CliError> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<Int64Array>())
        .ok_or_else(|| usage(format!("the lake's result has no integer column {name}")))
}

fn bools<'a>(b: &'a RecordBatch, name: &str) -> Result<&'a BooleanArray, CliError> {
    b.column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<BooleanArray>())
        .ok_or_else(|| usage(format!("the lake's result has no boolean column {name}")))
}

fn opt_str(a: &StringArray, i: usize) -> Option<String> {
    (!a.is_null(i)).then(|| a.value(i).to_owned())
}

fn request_inputs(b: &RecordBatch, out: &mut Vec<Input>) -> Result<(), CliError> {
    let (event_id, service, operation) = (strings(b, "event_id")?, strings(b, "service")?, strings(b, "operation")?);
    let (decision, outcome, rule, reason) =
        (strings(b, "decision")?, strings(b, "outcome")?, strings(b, "rule")?, strings(b, "reason")?);
    let (currency, account) = (strings(b, "currency")?, strings(b, "stripe_account")?);
    let (at, status, amount) = (ints(b, "at_us")?, ints(b, "status")?, ints(b, "amount")?);
    let livemode = bools(b, "livemode")?;
    for i in 0..b.num_rows() {
        let outcome_i = outcome.value(i);
        out.push(Input::Request(RequestInput {
            event_id: event_id.value(i).to_owned(),
            at_us: at.value(i),
            service: opt_str(service, i).unwrap_or_else(|| UNAUTHENTICATED.to_owned()),
            operation: opt_str(operation, i),
            status: u16::try_from(status.value(i)).unwrap_or(0),
            refusal: refusal_of(
                decision.value(i),
                outcome_i,
                opt_str(rule, i).as_deref(),
                opt_str(reason, i).as_deref(),
            ),
            upstream_error: outcome_i == "upstream_error",
            amount: (!amount.is_null(i)).then(|| amount.value(i)),
            currency: opt_str(currency, i),
            stripe_account: opt_str(account, i),
            livemode: (!livemode.is_null(i)).then(|| livemode.value(i)),
        }));
    }
    Ok(())
}

fn webhook_inputs(b: &RecordBatch, out: &mut Vec<Input>) -> Result<(), CliError> {
    let (event_id, endpoint, event_type) =
        (strings(b, "event_id")?, strings(b, "endpoint")?, strings(b, "event_type")?);
    // Alerts cite Stripe's event id (`evt_…`) where the row has one, else keygate's row id.
    let stripe_id = strings(b, "stripe_event_id")?;
    let at = ints(b, "at_us")?;
    let livemode = bools(b, "livemode")?;
    for i in 0..b.num_rows() {
        let Some(event_type) = opt_str(event_type, i) else { continue };
        let id = opt_str(stripe_id, i).unwrap_or_else(|| event_id.value(i).to_owned());
        out.push(Input::Webhook(WebhookInput {
            event_id: id,
            at_us: at.value(i),
            service: endpoint.value(i).to_owned(),
            event_type,
            livemode: (!livemode.is_null(i)).then(|| livemode.value(i)),
        }));
    }
    Ok(())
}

async fn read(
    lake: &Lake,
    sql: &str,
    f: fn(&RecordBatch, &mut Vec<Input>) -> Result<(), CliError>,
) -> Result<Vec<Input>, CliError> {
    let ctx = session(lake).await?;
    let df = ctx.sql(sql).await.map_err(|e| usage(format!("reading the lake: {e}")))?;
    let mut stream = df.execute_stream().await.map_err(|e| usage(format!("reading the lake: {e}")))?;
    let mut inputs = Vec::new();
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| usage(format!("reading the lake: {e}")))?;
        f(&batch, &mut inputs)?;
    }
    Ok(inputs)
}

/// Runs the detectors over the lake from `since_us` to `until_us` (or now) and prints their
/// alerts.
pub async fn run(lake: &Lake, config: &AnomaliesConfig, opts: &Options) -> Result<(), CliError> {
    let end_us = opts.until_us.unwrap_or_else(|| keygate_auditlog::row::micros(std::time::SystemTime::now()));
    let day = quote(&date_of(opts.since_us));
    let services = if opts.services.is_empty() {
        String::new()
    } else {
        format!(" AND {{col}} IN ({})", opts.services.iter().map(|s| quote(s)).collect::<Vec<_>>().join(", "))
    };
    let requests = format!(
        "SELECT event_id, CAST(completed_at AS BIGINT) AS at_us, service, operation, CAST(status AS BIGINT) AS status, \
         decision, outcome, rule, reason, amount, currency, stripe_account, livemode FROM audit \
         WHERE dt >= {day} AND CAST(completed_at AS BIGINT) >= {since} AND CAST(completed_at AS BIGINT) < {end_us}{filter} \
         ORDER BY at_us, event_id",
        since = opts.since_us,
        filter = services.replace("{col}", "service"),
    );
    let webhooks = format!(
        "SELECT event_id, stripe_event_id, CAST(received_at AS BIGINT) AS at_us, endpoint, event_type, livemode FROM webhooks \
         WHERE dt >= {day} AND kind = 'received' AND CAST(received_at AS BIGINT) >= {since} \
         AND CAST(received_at AS BIGINT) < {end_us}{filter} ORDER BY at_us, event_id",
        since = opts.since_us,
        filter = services.replace("{col}", "endpoint"),
    );
    let mut inputs = read(lake, &requests, request_inputs).await?;
    let rows = inputs.len();
    let hooks = read(lake, &webhooks, webhook_inputs).await?;
    let events = hooks.len();
    inputs.extend(hooks);
    // Both lists are sorted; a stable sort of their concatenation merges them.
    inputs.sort_by_key(Input::at_us);
    let mut engine = Engine::new(config);
    let mut alerts: Vec<Alert> = Vec::new();
    for input in &inputs {
        alerts.extend(engine.observe(input));
    }
    alerts.extend(engine.advance(end_us));
    let shadow = alerts.iter().filter(|a| a.mode == Mode::Shadow).count();
    let dropped = engine.dropped_inputs();
    let summary = format!(
        "{} alert(s) ({shadow} in shadow mode{}) over {rows} request row(s) and {events} webhook event(s) since {}{}{}",
        alerts.len() - shadow,
        if opts.include_shadow || shadow == 0 { "" } else { ", not shown: pass --include-shadow" },
        rfc3339(opts.since_us),
        opts.until_us.map(|u| format!(" until {}", rfc3339(u))).unwrap_or_default(),
        if dropped > 0 { format!("; {dropped} input(s) past max_series ignored") } else { String::new() }
    );
    if opts.format == AnomalyFormat::Html {
        let shown: Vec<&Alert> = alerts.iter().filter(|a| opts.include_shadow || a.mode == Mode::Alert).collect();
        out_line(&html::render(&shown, &inputs, config, &summary))?;
    }
    if opts.format == AnomalyFormat::Table {
        out_line(&format!(
            "{:<20}  {:<8}  {:<6}  {:<13}  {:<12}  {:<36}  {}",
            "at", "severity", "mode", "detector", "service", "subject", "observed / expected / records"
        ))?;
    }
    for a in alerts.iter().filter(|a| opts.include_shadow || a.mode == Mode::Alert) {
        match opts.format {
            AnomalyFormat::Html => {}
            AnomalyFormat::Jsonl => {
                let mut v = serde_json::to_value(a).map_err(usage)?;
                if let serde_json::Value::Object(m) = &mut v {
                    m.insert("at".into(), rfc3339(a.at_us).into());
                }
                out_line(&v.to_string())?;
            }
            AnomalyFormat::Table => {
                let records = match a.event_ids.as_slice() {
                    [] => "no records".to_owned(),
                    [one] => one.clone(),
                    [first, rest @ ..] => format!("{first} and {} more", rest.len()),
                };
                out_line(&format!(
                    "{:<20}  {:<8}  {:<6}  {:<13}  {:<12}  {:<36}  {}; expected {}; {records}",
                    rfc3339(a.at_us),
                    a.severity.to_string(),
                    a.mode.to_string(),
                    a.detector.as_str(),
                    a.service,
                    a.subject,
                    a.observed,
                    a.expected
                ))?;
            }
        }
    }
    eprintln!("auditlog: {summary}");
    if let Some(path) = &opts.save_state {
        engine.state().save(path).map_err(usage)?;
        eprintln!("auditlog: learned baselines saved to {}", path.display());
    }
    Ok(())
}
