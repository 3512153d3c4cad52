//! `auditlog anomalies` over a lake written by keygate's own audit writer: a generated five-week
//! history of three services (daily and weekly seasonality, noise, several currencies, connected
//! accounts, webhook events) with planted anomalies of every kind. Every planted one is found
//! and cited; the clean history raises at most one unexplained alert per service-day and at most
//! one per ten service-days overall (the bounds docs/anomalies.md states).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use keygate_auditlog::webhook::{WebhookKind, WebhookRecord};
use keygate_auditlog::{AuditConfig, Durability, Exchange, Outcome};
use keygate_detectors::simulate::{self, HistoryConfig};
use keygate_detectors::{Alert, EngineState, Input};

fn at(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap())
}

fn run(args: &[&str]) -> (String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_auditlog")).args(args).env_remove("KEYGATE_CONFIG").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "auditlog {args:?}: {err}");
    (String::from_utf8_lossy(&o.stdout).into_owned(), err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_over_the_lake_find_every_planted_one_and_stay_quiet_otherwise() {
    let env = env();
    let now_us = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros()).unwrap();
    let hour = 3_600_000_000;
    // Five whole weeks ending at the last full hour.
    let start_us = (now_us / hour) * hour - 5 * 168 * hour;
    let history = simulate::generate(&HistoryConfig { start_us, scale: 0.5, ..HistoryConfig::default() });
    let cfg = AuditConfig {
        durability: Durability::Async,
        roll: keygate_auditlog::RollConfig { max_bytes: 64 * 1024 * 1024, max_age: Duration::from_secs(3600) },
        ..env.cfg.clone()
    };
    let log = env.open_cfg(&cfg).await;
    for input in &history.inputs {
        match input {
            Input::Request(r) => {
                let op = r.operation.clone().unwrap_or_default();
                let (method, path) = op.split_once(' ').unwrap_or(("POST", "/v1/x"));
                let mut ex = Exchange::new(r.event_id.parse().unwrap(), method, path);
                ex.received_at = at(r.at_us - 2000);
                ex.completed_at = at(r.at_us);
                ex.service = Some(r.service.clone());
                ex.peer = "127.0.0.1:5555".into();
                ex.operation = r.operation.clone();
                ex.stripe_account = r.stripe_account.clone();
                ex.livemode = r.livemode;
                ex.status = r.status;
                ex.amount = r.amount;
                ex.currency = r.currency.clone();
                if let Some(code) = &r.refusal {
                    ex.decision = "deny".into();
                    ex.reason = Some(code.clone());
                    ex.outcome = Outcome::Rejected;
                }
                log.record(ex, None).await.unwrap();
            }
            Input::Webhook(w) => {
                let mut rec = WebhookRecord::new(WebhookKind::Received, &w.service);
                rec.received_at = at(w.at_us);
                rec.stripe_event_id = Some(w.event_id.clone());
                rec.event_type = Some(w.event_type.clone());
                rec.livemode = w.livemode;
                rec.status = Some(200);
                log.record_webhook(rec).await.unwrap();
            }
        }
    }
    log.shutdown().await.unwrap();

    let lake = env.lake_dir().display().to_string();
    let since = humantime::format_rfc3339_seconds(at(start_us)).to_string();
    let state = env.dir.path().join("anomalies-state.json");
    let state_arg = state.display().to_string();
    let (out, err) =
        run(&["anomalies", "--lake", &lake, "--since", &since, "--format", "jsonl", "--save-state", &state_arg]);
    let alerts: Vec<Alert> =
        out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    let e = simulate::evaluate(&history, &alerts);
    eprintln!("{err}");
    for a in &e.unexplained {
        eprintln!("unexplained: {}", a.summary());
    }
    eprintln!(
        "{} rows, {} alerts, recall {:.2}, precision {:.2}, {} unexplained over {} service-days",
        history.inputs.len(),
        e.alerts,
        e.recall,
        e.precision,
        e.unexplained.len(),
        e.service_days
    );
    let missed: Vec<&String> = e.found.iter().filter(|f| !f.1).map(|f| &f.0).collect();
    assert!(missed.is_empty(), "missed: {missed:?}\n{err}");
    assert!(e.max_unexplained_per_service_day <= 1, "{:?}", e.unexplained);
    assert!(e.unexplained.len() * 10 <= e.service_days, "{:?}", e.unexplained);
    // Each cited record is in the lake: `auditlog show` would open it.
    let amount = alerts.iter().find(|a| a.detector == keygate_detectors::DetectorKind::Amount).unwrap();
    let (shown, _) = run(&["show", "--lake", &lake, &amount.event_ids[0]]);
    assert!(shown.contains("675000"), "{shown}");
    // The learned baselines were saved, and load.
    assert!(EngineState::load(&state).unwrap().is_some());

    // One service only, as a table: a header and one line per alert, none of another service.
    let (table, _) = run(&["anomalies", "--lake", &lake, "--since", &since, "--service", "payouts"]);
    let lines: Vec<&str> = table.lines().collect();
    let payouts = alerts.iter().filter(|a| a.service == "payouts").count();
    assert_eq!(lines.len(), 1 + payouts, "{table}");
    assert!(lines[1..].iter().all(|l| l.contains("payouts") && !l.contains("checkout")), "{table}");
}
