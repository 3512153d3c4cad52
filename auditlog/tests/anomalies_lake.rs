//! `auditlog anomalies` over a lake written by keygate's own audit writer: a generated five-week
//! history of three services (daily and weekly seasonality, noise, several currencies, connected
//! accounts, webhook events) with planted anomalies of every kind. Every planted one is found
//! and cited; the clean history raises at most one unexplained alert per service-day and at most
//! one per ten service-days overall (the bounds docs/anomalies.md states).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::needless_range_loop)]

mod common;

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use keygate_auditlog::{AuditConfig, Durability};
use keygate_detectors::simulate::{self, HistoryConfig};
use keygate_detectors::{Alert, EngineState};

fn at(us: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(u64::try_from(us).unwrap())
}

fn run(args: &[&str]) -> (String, String) {
    let o = Command::new(env!("CARGO_BIN_EXE_auditlog")).args(args).env_remove("KEYGATE_CONFIG").output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "auditlog {args:?}: {err}");
    (String::from_utf8_lossy(&o.stdout).into_owned(), err)
}

/// Debian's chromium (scripts/setup-test-env.sh installs it and exports KEYGATE_CHROMIUM):
/// the report's DOM as Chromium built it, and a screenshot of its top.
fn chromium(report: &std::path::Path, dir: &std::path::Path) -> (String, std::path::PathBuf) {
    let bin = std::env::var("KEYGATE_CHROMIUM")
        .expect("KEYGATE_CHROMIUM is not set: run scripts/setup-test-env.sh, which installs Debian's chromium");
    let profile = format!("--user-data-dir={}", dir.join("chromium-profile").display());
    let url = format!("file://{}", report.display());
    let args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        profile.as_str(),
    ];
    // `timeout`: a browser that hangs fails the test instead of holding CI.
    let browse = |extra: &[&str]| {
        let o = Command::new("timeout").arg("90").arg(&bin).args(args).args(extra).arg(&url).output().unwrap();
        assert!(o.status.success(), "chromium {extra:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let dom = browse(&["--dump-dom"]);
    let shot = dir.join("report.png");
    let arg = format!("--screenshot={}", shot.display());
    browse(&[arg.as_str(), "--window-size=1000,1600", "--hide-scrollbars"]);
    (dom, shot)
}

/// The pixels of a PNG file (8-bit RGB or RGBA, not interlaced: what Chromium writes), as RGB.
fn decode_png(bytes: &[u8]) -> Vec<[u8; 3]> {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let (mut at, mut idat, mut header) = (8, Vec::new(), None);
    while at + 8 <= bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let (kind, data) = (&bytes[at + 4..at + 8], &bytes[at + 8..at + 8 + len]);
        match kind {
            b"IHDR" => header = Some(data.to_vec()),
            b"IDAT" => idat.extend_from_slice(data),
            _ => {}
        }
        at += 12 + len;
    }
    let h = header.expect("IHDR");
    let width = u32::from_be_bytes(h[0..4].try_into().unwrap()) as usize;
    let height = u32::from_be_bytes(h[4..8].try_into().unwrap()) as usize;
    let bpp = match (h[8], h[9], h[12]) {
        (8, 2, 0) => 3,
        (8, 6, 0) => 4,
        other => panic!("unexpected PNG format (bit depth, colour type, interlace) {other:?}"),
    };
    let mut raw = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::ZlibDecoder::new(idat.as_slice()), &mut raw).unwrap();
    let stride = width * bpp;
    assert_eq!(raw.len(), height * (stride + 1), "PNG data size");
    let mut prev = vec![0u8; stride];
    let mut pixels = Vec::with_capacity(width * height);
    for row in raw.chunks_exact(stride + 1) {
        let (filter, line) = (row[0], &row[1..]);
        let mut cur = vec![0u8; stride];
        for i in 0..stride {
            let a = if i >= bpp { i16::from(cur[i - bpp]) } else { 0 };
            let b = i16::from(prev[i]);
            let c = if i >= bpp { i16::from(prev[i - bpp]) } else { 0 };
            let predictor = match filter {
                0 => 0,
                1 => a,
                2 => b,
                3 => (a + b) / 2,
                4 => {
                    let p = a + b - c;
                    let (pa, pb, pc) = ((p - a).abs(), (p - b).abs(), (p - c).abs());
                    if pa <= pb && pa <= pc {
                        a
                    } else if pb <= pc {
                        b
                    } else {
                        c
                    }
                }
                other => panic!("bad PNG filter {other}"),
            };
            cur[i] = line[i].wrapping_add(u8::try_from(predictor & 0xff).unwrap());
        }
        pixels.extend(cur.chunks_exact(bpp).map(|p| [p[0], p[1], p[2]]));
        prev = cur;
    }
    pixels
}

/// The share of pixels that are not white, and the number of the flagged points' red.
fn pixels(png_file: &std::path::Path) -> (f64, usize) {
    let px = decode_png(&std::fs::read(png_file).unwrap());
    let non_white = px.iter().filter(|p| p[0] < 245 || p[1] < 245 || p[2] < 245).count();
    let red = px.iter().filter(|p| p[0] > 180 && p[1] < 90 && p[2] < 90).count();
    (non_white as f64 / px.len().max(1) as f64, red)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anomalies_over_the_lake_find_every_planted_one_and_stay_quiet_otherwise() {
    let env = env();
    let now_us = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_micros()).unwrap();
    // Five whole weeks ending at the last Monday 00:00 UTC.
    let start_us = simulate::start_before_last_monday(now_us, 5);
    let history = simulate::generate(&HistoryConfig { start_us, scale: 0.5, ..HistoryConfig::default() });
    let cfg = AuditConfig {
        durability: Durability::Async,
        roll: keygate_auditlog::RollConfig { max_bytes: 64 * 1024 * 1024, max_age: Duration::from_secs(3600) },
        ..env.cfg.clone()
    };
    let log = env.open_cfg(&cfg).await;
    for input in &history.inputs {
        keygate_auditlog::anomaly::record_detector_input(&log, input).await.unwrap();
    }
    log.shutdown().await.unwrap();

    let lake = env.lake_dir().display().to_string();
    let since = humantime::format_rfc3339_seconds(at(start_us)).to_string();
    // The history's end: hours after it (up to now) hold no traffic and are no silence.
    let until = humantime::format_rfc3339_seconds(at(start_us + 5 * 7 * 24 * 3_600_000_000)).to_string();
    let state = env.dir.path().join("anomalies-state.json");
    let state_arg = state.display().to_string();
    // Half of the generator's traffic: billing's invoice slot expects fewer than the default
    // silence floor (20 an hour), so the configuration lowers it, as docs/anomalies.md advises for
    // a quieter service.
    let config = env.dir.path().join("keygate.yaml");
    std::fs::write(&config, "anomalies:\n  request_rate:\n    silence_min_expected: 8\n").unwrap();
    let config = config.display().to_string();
    // Every run below covers the same window of the same lake with the same configuration.
    let anomalies = |more: &[&str]| {
        let mut args = vec!["anomalies", "--config", &config, "--lake", &lake, "--since", &since, "--until", &until];
        args.extend_from_slice(more);
        run(&args)
    };
    let (out, err) = anomalies(&["--format", "jsonl", "--save-state", &state_arg]);
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

    // The HTML report: self-contained, one plot per alert, rendered by headless Chromium.
    let (page, _) = anomalies(&["--format", "html"]);
    for outside in ["http://", "https://", "<script", "<link", "@import", "url("] {
        assert!(!page.contains(outside), "the report must reference nothing outside itself ({outside})");
    }
    let report = env.dir.path().join("report.html");
    std::fs::write(&report, &page).unwrap();
    let (dom, shot) = chromium(&report, env.dir.path());
    assert_eq!(dom.matches("<section class=\"alert").count(), alerts.len(), "one section per alert");
    assert_eq!(dom.matches("<svg class=\"plot\"").count(), alerts.len(), "one plot per alert");
    assert!(dom.matches("class=\"flagged\"").count() >= alerts.len(), "every plot shows its flagged points");
    let (non_white, red) = pixels(&shot);
    eprintln!("screenshot: {:.1}% non-white pixels, {red} flagged-red pixels", non_white * 100.0);
    assert!(non_white > 0.02, "the screenshot is blank: {:.3}% non-white", non_white * 100.0);
    assert!(red > 0, "no flagged point is visible in the screenshot");

    // One service only, as a table: a header and one line per alert, none of another service.
    let (table, _) = anomalies(&["--service", "payouts"]);
    let lines: Vec<&str> = table.lines().collect();
    let payouts = alerts.iter().filter(|a| a.service == "payouts").count();
    assert_eq!(lines.len(), 1 + payouts, "{table}");
    assert!(lines[1..].iter().all(|l| l.contains("payouts") && !l.contains("checkout")), "{table}");
}
