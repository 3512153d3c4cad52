//! Bounded memory (issue 21): at high load with large responses and the audit on, keygate's peak
//! RSS stays under the bound docs/deploy.md documents, computed here from the configuration the
//! test gives keygate, and measured from `/proc` (`VmHWM`, the resident set's high-water mark).
//!
//! The load is sized to make the lake shipper ship a full default-sized WAL segment (64 MiB):
//! before the shipper streamed row groups, it built that segment's Parquet file in memory and
//! peaked at about four times the segment, far above the bound.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::time::{Duration, Instant};

use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::proxy_setup::{ProxySetup, SetupOptions};

const MIB: u64 = 1024 * 1024;

/// The limits this test runs with (the formula's inputs).
const MAX_BUFFERED: u64 = 8 * MIB;
const MAX_BODY: u64 = MIB;
const MAX_RESPONSE: u64 = MIB;
const MAX_CONNECTIONS: u64 = 64;
/// keygate's defaults, left as they are.
const ROLL_MAX_BYTES: u64 = 64 * MIB;
const MULTIPART_THRESHOLD: u64 = 8 * MIB;

/// The bound of docs/deploy.md ("Memory") for this configuration, term by term, above the
/// `baseline` keygate had when it was ready; `queue_max_bytes` is `audit.queue_max_bytes`.
fn documented_bound(baseline: u64, queue_max_bytes: u64) -> u64 {
    // The request path (docs/reliability.md, Memory): bodies in the buffer budget, HTTP/1.1
    // head buffers, records waiting for the WAL writer.
    let request_path = baseline + MAX_BUFFERED + MAX_CONNECTIONS * 64 * 1024 + queue_max_bytes;
    // Records being prepared: one per core at a time, each up to 10 × its bodies.
    let largest_record = MAX_RESPONSE + MAX_BODY;
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get) as u64;
    let preparing = cores * 10 * largest_record;
    // The lake shipper: the file being written, and the row group being encoded.
    let shipper = MULTIPART_THRESHOLD.max(3 * 5 * MIB) + 3 * (MIB + largest_record);
    let allocator_slack = 32 * MIB;
    request_path + preparing + shipper + allocator_slack
}

/// (`VmRSS`, `VmHWM`) of a process, in bytes.
fn rss(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in /proc/PID/status"));
        line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).expect("a size in kB") * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn metric(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peak_rss_at_high_load_with_large_responses_stays_under_the_documented_bound() {
    // `durability: sync` (the default) and the default `audit.queue_max_bytes`.
    peak_rss_stays_under_the_documented_bound("", 8 * MIB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_durability_async_the_audit_queue_stays_inside_its_byte_bound_at_high_load() {
    // `async` acknowledges a request once its record is queued: the queue, not the requests,
    // is what could grow; `audit.queue_max_bytes` bounds it (and the bound follows it).
    let queue_max_bytes = 4 * MIB;
    peak_rss_stays_under_the_documented_bound(
        &format!("  durability: async\n  queue_max_bytes: {queue_max_bytes}\n"),
        queue_max_bytes,
    )
    .await;
}

async fn peak_rss_stays_under_the_documented_bound(audit_extra: &str, queue_max_bytes: u64) {
    let upstream = FakeStripe::start(Behavior::LargeList { bytes: 256 * 1024 }).await;
    let mut options = SetupOptions::new(&upstream.url());
    options.audit = true;
    options.audit_extra = audit_extra.to_owned();
    options.extra_config = format!(
        "limits:\n  max_body_bytes: {MAX_BODY}\n  max_file_body_bytes: {MAX_BODY}\n  max_response_bytes: {MAX_RESPONSE}\n  max_buffered_bytes: {MAX_BUFFERED}\n  max_connections: {MAX_CONNECTIONS}\n"
    );
    let setup = ProxySetup::start(options);
    let (proxy, token) = (setup.keygate.proxy, setup.token.clone());
    let (baseline, _) = rss(setup.keygate.pid());

    // 16 connections, 40 requests each: about 160 MiB of responses, recorded, so more than one
    // 64 MiB WAL segment fills and is shipped.
    let requests_per_thread = 40;
    let threads: Vec<_> = (0..16)
        .map(|t| {
            let token = token.clone();
            std::thread::spawn(move || {
                let mut statuses = Vec::new();
                for i in 0..requests_per_thread {
                    let path = format!("/v1/charges?limit=100&starting_after=ch_{t}_{i}");
                    let response = keygate_tests::http::request(proxy, "GET", &path, &token, &[], "")
                        .expect("a request through keygate");
                    statuses.push(response.status);
                }
                statuses
            })
        })
        .collect();
    let statuses: Vec<u16> = threads.into_iter().flat_map(|t| t.join().expect("a load thread")).collect();
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(ok, statuses.len(), "every request answered 200: {statuses:?}");

    // Wait until a full segment's file is in the lake (the shipper ran on a 64 MiB segment).
    let deadline = Instant::now() + Duration::from_secs(120);
    let rows = loop {
        let metrics = setup.keygate.metrics();
        let rows = metric(&metrics, "keygate_audit_lake_rows_total");
        if rows > 0.0 {
            break rows;
        }
        assert!(Instant::now() < deadline, "no lake file committed within 120 s:\n{}", setup.keygate.stderr_text());
        std::thread::sleep(Duration::from_millis(200));
    };
    let files = keygate_tests::audit::files_under(&setup.dir.path().join("lake").join("audit"));
    let largest = files.iter().map(|(_, bytes)| bytes.len() as u64).max().unwrap_or(0);
    assert!(
        largest > ROLL_MAX_BYTES / 2,
        "a full segment was shipped (largest lake file {largest} bytes, {rows} rows in the lake)"
    );

    let (_, peak) = rss(setup.keygate.pid());
    let bound = documented_bound(baseline, queue_max_bytes);
    println!(
        "peak RSS {:.1} MiB, documented bound {:.1} MiB (baseline {:.1} MiB); {} requests, {rows} rows in the lake, largest file {:.1} MiB",
        peak as f64 / MIB as f64,
        bound as f64 / MIB as f64,
        baseline as f64 / MIB as f64,
        statuses.len(),
        largest as f64 / MIB as f64
    );
    assert!(peak <= bound, "peak RSS {peak} bytes is over the documented bound of {bound} bytes");
    setup.assert_no_secret_leaked();
}
