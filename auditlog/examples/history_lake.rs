//! Writes a generated multi-week history (keygate-detectors' `simulate`: three services, daily and
//! weekly seasonality, several currencies, connected accounts, webhook events, planted anomalies)
//! into a lake through keygate's own audit writer, for measuring `auditlog anomalies` over a
//! lake (docs/benchmarks.md, issue 18):
//!
//! ```text
//! cargo run --release -p keygate-auditlog --example history_lake -- DIR [SCALE]
//! target/release/auditlog anomalies --lake DIR/lake --since <printed> --format jsonl
//! ```
//!
//! SCALE (default 1.0) multiplies the generator's traffic. The lake's key-encryption key and
//! signing key are random and thrown away: `auditlog anomalies` reads plaintext columns only.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::print_stdout, clippy::print_stderr)]

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use keygate_auditlog::{AuditConfig, AuditLog, Durability, LocalKek, RollConfig, SigningKey};
use keygate_detectors::Input;
use keygate_detectors::simulate::{self, HistoryConfig};

fn at(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(us).expect("a time after 1970"))
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let dir = std::path::PathBuf::from(args.next().expect("usage: history_lake DIR [SCALE]"));
    let scale: f64 = args.next().map_or(1.0, |s| s.parse().expect("SCALE is a number"));
    let now_us = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros()).unwrap();
    // Five whole weeks ending at the last Monday 00:00 UTC, as auditlog/tests/anomalies_lake.rs.
    let start_us = simulate::start_before_last_monday(now_us, 5);
    let history = simulate::generate(&HistoryConfig { start_us, scale, ..HistoryConfig::default() });
    let cfg = AuditConfig {
        wal_dir: dir.join("wal"),
        lake: dir.join("lake").display().to_string(),
        kek: "env://UNUSED".into(),
        signing_key: "env://UNUSED".into(),
        durability: Durability::Async,
        roll: RollConfig { max_bytes: 64 * 1024 * 1024, max_age: Duration::from_secs(3600) },
        ..AuditConfig::default()
    };
    let kek = Arc::new(LocalKek::from_text(&hex::encode(rand::random::<[u8; 32]>())).unwrap());
    let log = AuditLog::open(&cfg, kek, SigningKey::generate()).await.unwrap();
    let started = Instant::now();
    let (mut requests, mut events) = (0_u64, 0_u64);
    for input in &history.inputs {
        keygate_auditlog::anomaly::record_detector_input(&log, input).await.unwrap();
        match input {
            Input::Request(_) => requests += 1,
            Input::Webhook(_) => events += 1,
        }
    }
    log.shutdown().await.unwrap();
    eprintln!(
        "history_lake: {requests} request rows and {events} webhook events in {:.1} s; lake {}",
        started.elapsed().as_secs_f64(),
        dir.join("lake").display()
    );
    println!("{}", humantime::format_rfc3339_seconds(at(start_us)));
}
