//! The benchmark's plan and its execution: measure fsync, find each scenario's maximum
//! throughput, then measure latency at fixed rates, each scenario three times with the order
//! rotated between repetitions so that machine drift (other work, thermal, page cache) hits every
//! scenario alike; then medians, spreads, added latency over D, ratios and targets.
//!
//! Phases:
//! 1. **maximum** — a fresh stack per (repetition, scenario), a closed-loop run; peak RSS and CPU
//!    per request at saturation.
//! 2. **fixed rates** — a fresh stack per (repetition, scenario), open-loop runs at the fixed
//!    rates (100 and 1,000/s) and at 80 % of the scenario's median maximum, in ascending order, so
//!    that the peak RSS read after the 1,000/s run is the peak at (at most) that rate. D also runs
//!    at every proxy's 80 % rate, so that added latency is always taken at the same rate.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::error::BenchError;
use crate::loadgen::LoadReport;
use crate::procs::pinned;
use crate::procstat;
use crate::report::{self, Added, MaxResult, RateResult, RunRecord, ScenarioResult, Stat};
use crate::stack::{Environment, REQUEST_PATH, Scenario, Stack};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// `full` or `smoke`.
    pub mode: String,
    pub reps: usize,
    pub warmup: Duration,
    pub max_duration: Duration,
    pub rate_duration: Duration,
    pub max_connections: usize,
    pub rate_connections: usize,
    pub fixed_rates: Vec<f64>,
    /// Fraction of the median maximum used as each scenario's high fixed rate.
    pub high_fraction: f64,
    /// Upper bound on the high rate (the smoke mode keeps every rate low).
    pub high_cap: Option<f64>,
    /// The fixed rate the latency, CPU and RSS targets are read at.
    pub reference_rate: f64,
    pub body_bytes: usize,
    pub fsync_samples: u64,
}

impl Plan {
    /// The real benchmark: about 20 minutes.
    pub fn full() -> Plan {
        Plan {
            mode: "full".to_owned(),
            reps: 3,
            warmup: Duration::from_secs(2),
            max_duration: Duration::from_secs(10),
            rate_duration: Duration::from_secs(15),
            max_connections: 64,
            rate_connections: 32,
            fixed_rates: vec![100.0, 1000.0],
            high_fraction: 0.8,
            high_cap: None,
            reference_rate: 1000.0,
            body_bytes: 1024,
            fsync_samples: 2000,
        }
    }

    /// Every scenario and every code path, at low rates, about a second per run (debug binaries
    /// are fine): for the test suite, so that the harness cannot rot.
    pub fn smoke() -> Plan {
        Plan {
            mode: "smoke".to_owned(),
            reps: 1,
            warmup: Duration::from_millis(200),
            max_duration: Duration::from_secs(1),
            rate_duration: Duration::from_secs(1),
            max_connections: 8,
            rate_connections: 4,
            fixed_rates: vec![50.0, 100.0],
            high_fraction: 0.8,
            high_cap: Some(200.0),
            reference_rate: 100.0,
            body_bytes: 1024,
            fsync_samples: 50,
        }
    }
}

/// `scenarios` rotated left by `rep`: each repetition starts with a different scenario.
pub fn rotated(scenarios: &[Scenario], rep: usize) -> Vec<Scenario> {
    let mut order = scenarios.to_vec();
    if !order.is_empty() {
        let shift = rep % order.len();
        order.rotate_left(shift);
    }
    order
}

fn high_label(fraction: f64, of: Option<Scenario>) -> String {
    let pct = (fraction * 100.0).round();
    match of {
        Some(scenario) => format!("{pct:.0}% of {} max", scenario.name()),
        None => format!("{pct:.0}% of max"),
    }
}

/// Runs the plan; `progress` receives one line per step.
pub fn run(env: &Environment, plan: &Plan, progress: &mut dyn FnMut(&str)) -> Result<report::Results, BenchError> {
    let started_at = now_rfc3339();
    let load_before = procstat::load_average()?;
    let mut load_1m_max = load_before[0];
    let scenarios = Scenario::ALL.to_vec();

    progress(&format!("fsync: {} appends + fdatasync in {}", plan.fsync_samples, env.work_dir.display()));
    let fsync = crate::fsync::measure(&env.work_dir.join("fsync-probe"), plan.fsync_samples, 4096)?;
    progress(&format!("fsync p50 {:.0} µs, p99 {:.0} µs ({})", fsync.p50_us, fsync.p99_us, fsync.filesystem));

    let mut runs: Vec<RunRecord> = Vec::new();
    let mut order = Vec::new();

    // Phase 1: maximum throughput.
    for rep in 0..plan.reps {
        let rep_order = rotated(&scenarios, rep);
        order.push(rep_order.iter().map(|s| s.name().to_owned()).collect::<Vec<_>>());
        for &scenario in &rep_order {
            progress(&format!("[{}/{}] {}: maximum throughput", rep + 1, plan.reps, scenario.name()));
            let mut stack = Stack::start(env, scenario)?;
            let record = measure(env, &mut stack, plan, rep, None, "max", plan.max_connections)?;
            load_1m_max = load_1m_max.max(record.load_1m_after);
            progress(&format!("    {:.0} req/s, p99 {:.0} µs", record.load.throughput_rps, record.load.latency_us.p99));
            runs.push(record);
            stack.stop();
        }
    }
    let max_median = |scenario: Scenario| {
        let values: Vec<f64> = runs
            .iter()
            .filter(|r| r.kind == "max" && r.scenario == scenario.name())
            .map(|r| r.load.throughput_rps)
            .collect();
        Stat::of(&values).median
    };
    // Each proxy scenario's high fixed rate, from its median maximum (rounded to 10/s).
    let high_rates: Vec<(Scenario, f64)> = scenarios
        .iter()
        .map(|&scenario| {
            let rate = (max_median(scenario) * plan.high_fraction / 10.0).round() * 10.0;
            let rate = plan.high_cap.map_or(rate, |cap| rate.min(cap));
            (scenario, if rate.is_finite() { rate.max(10.0) } else { 10.0 })
        })
        .collect();
    let high_rate =
        |scenario: Scenario| high_rates.iter().find(|(s, _)| *s == scenario).map_or(10.0, |(_, rate)| *rate);

    // Phase 2: fixed rates, ascending.
    let rates_of = |scenario: Scenario| -> Vec<(String, f64)> {
        let mut rates: Vec<(String, f64)> = plan.fixed_rates.iter().map(|&r| (report::rate_label(r), r)).collect();
        if scenario.has_proxy() {
            rates.push((high_label(plan.high_fraction, None), high_rate(scenario)));
        } else {
            for proxy in scenarios.iter().copied().filter(|s| s.has_proxy()) {
                rates.push((high_label(plan.high_fraction, Some(proxy)), high_rate(proxy)));
            }
        }
        rates.sort_by(|a, b| a.1.total_cmp(&b.1));
        rates
    };
    for rep in 0..plan.reps {
        for &scenario in &rotated(&scenarios, rep) {
            let mut stack = Stack::start(env, scenario)?;
            for (label, rate) in rates_of(scenario) {
                progress(&format!("[{}/{}] {}: {label} ({rate:.0} req/s)", rep + 1, plan.reps, scenario.name()));
                let record = measure(env, &mut stack, plan, rep, Some((label, rate)), "rate", plan.rate_connections)?;
                load_1m_max = load_1m_max.max(record.load_1m_after);
                progress(&format!(
                    "    p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs",
                    record.load.latency_us.p50, record.load.latency_us.p99, record.load.latency_us.p999
                ));
                runs.push(record);
            }
            stack.stop();
        }
    }

    let mut results: Vec<ScenarioResult> = scenarios.iter().map(|&scenario| aggregate(scenario, &runs, plan)).collect();
    add_latency_over_direct(&mut results);
    let max_of = |name: &str| results.iter().find(|s| s.name == name).map_or(f64::NAN, |s| s.max.throughput_rps.median);
    let ratios = report::Ratios {
        p0_over_n: max_of("P0") / max_of("N"),
        p1_over_p0: max_of("P1") / max_of("P0"),
        p2_over_p0: max_of("P2") / max_of("P0"),
    };
    let targets = report::evaluate_targets(&results, &fsync, plan.reference_rate);
    Ok(report::Results {
        schema: 1,
        started_at,
        finished_at: now_rfc3339(),
        host: report::Host {
            cpu_model: procstat::cpu_model(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned(),
            proxy_core: env.proxy_core,
            generator_core: env.generator_core,
            load_before,
            load_after: procstat::load_average()?,
            load_1m_max,
        },
        versions: report::Versions {
            keygate: command_version(&env.binary("keygate"), &["--version"]),
            nginx: command_version(&env.nginx, &["-v"]),
            git_commit: command_version(std::path::Path::new("git"), &["rev-parse", "--short", "HEAD"]),
        },
        setup: report::Setup {
            mode: plan.mode.clone(),
            reps: plan.reps,
            warmup_s: plan.warmup.as_secs_f64(),
            max_duration_s: plan.max_duration.as_secs_f64(),
            rate_duration_s: plan.rate_duration.as_secs_f64(),
            max_connections: plan.max_connections,
            rate_connections: plan.rate_connections,
            fixed_rates: plan.fixed_rates.clone(),
            high_fraction: plan.high_fraction,
            reference_rate: plan.reference_rate,
            request: format!("POST {REQUEST_PATH}"),
            body_bytes: plan.body_bytes,
            upstream_tls: env.upstream_tls,
            upstream_delay_ms: u64::try_from(env.upstream_delay.as_millis()).unwrap_or(u64::MAX),
            anomalies: env.anomalies,
            order,
            keygate_log: "info (one JSON access-log line per request to a file), TOKIO_WORKER_THREADS=1".to_owned(),
            nginx_log: "access_log (combined, unbuffered, one line per request to a file), worker_processes 1"
                .to_owned(),
        },
        fsync,
        scenarios: results,
        ratios,
        targets,
        runs,
    })
}

/// One load-generator run against a started stack, with the proxy's CPU and memory around it.
fn measure(
    env: &Environment,
    stack: &mut Stack,
    plan: &Plan,
    rep: usize,
    rate: Option<(String, f64)>,
    kind: &str,
    connections: usize,
) -> Result<RunRecord, BenchError> {
    let duration = if rate.is_some() { plan.rate_duration } else { plan.max_duration };
    let proxy_cpu_before = stack.proxy_cpu_seconds()?;
    let upstream_cpu_before = stack.upstream_cpu_seconds()?;
    let started = Instant::now();
    let load = run_load(env, stack, rate.as_ref().map(|r| r.1), connections, plan.warmup, duration, plan.body_bytes)?;
    let wall_s = started.elapsed().as_secs_f64();
    stack.ensure_running()?;
    let proxy_cpu_s = match (proxy_cpu_before, stack.proxy_cpu_seconds()?) {
        (Some(before), Some(after)) => Some(after - before),
        _ => None,
    };
    let upstream_cpu_s = stack.upstream_cpu_seconds()? - upstream_cpu_before;
    let proxy_cpu_us_per_req = proxy_cpu_s.map(|cpu| cpu * 1e6 / load.total_requests.max(1) as f64);
    let proxy_peak_rss_mib = stack.proxy_peak_rss_kib()?.map(|kib| kib as f64 / 1024.0);
    Ok(RunRecord {
        scenario: stack.scenario.name().to_owned(),
        rep,
        kind: kind.to_owned(),
        label: rate.as_ref().map_or_else(|| "max".to_owned(), |r| r.0.clone()),
        proxy_core_busy_pct: proxy_cpu_s.map(|cpu| cpu / wall_s * 100.0),
        generator_core_busy_pct: (upstream_cpu_s + load.generator_cpu_s) / wall_s * 100.0,
        load,
        wall_s,
        proxy_cpu_s,
        proxy_cpu_us_per_req,
        proxy_peak_rss_mib,
        upstream_cpu_s,
        load_1m_after: procstat::load_average()?[0],
    })
}

fn secs(duration: Duration) -> String {
    format!("{:.3}", duration.as_secs_f64())
}

/// Runs `bench-load` on the generator's core and parses its JSON report.
pub(crate) fn run_load(
    env: &Environment,
    stack: &Stack,
    rate: Option<f64>,
    connections: usize,
    warmup: Duration,
    duration: Duration,
    body_bytes: usize,
) -> Result<LoadReport, BenchError> {
    let mut command = pinned(env.generator_core, &env.binary("bench-load"));
    command
        .arg("--url")
        .arg(&stack.url)
        .arg("--connections")
        .arg(connections.to_string())
        .arg("--warmup-s")
        .arg(secs(warmup))
        .arg("--duration-s")
        .arg(secs(duration))
        .arg("--body-bytes")
        .arg(body_bytes.to_string())
        // The token travels in the environment, not on the command line that `ps` shows.
        .env("BENCH_AUTHORIZATION", stack.authorization());
    if let Some(rate) = rate {
        command.arg("--rate").arg(format!("{rate}"));
    }
    if let Some(ca) = &stack.ca_file {
        command.arg("--ca-file").arg(ca);
    }
    let output = command
        .output()
        .map_err(|source| BenchError::Net { what: "run bench-load (is it built?)".to_owned(), source })?;
    if !output.status.success() {
        return Err(BenchError::Process(format!(
            "bench-load against {} failed ({}): {}",
            stack.scenario.name(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }
    serde_json::from_slice(&output.stdout)
        .map_err(|source| BenchError::Json { what: "parse bench-load's report".to_owned(), source })
}

fn aggregate(scenario: Scenario, runs: &[RunRecord], plan: &Plan) -> ScenarioResult {
    let of = |kind: &str, label: &str| -> Vec<&RunRecord> {
        runs.iter().filter(|r| r.scenario == scenario.name() && r.kind == kind && r.label == label).collect()
    };
    let stat = |records: &[&RunRecord], f: &dyn Fn(&RunRecord) -> f64| -> Stat {
        Stat::of(&records.iter().map(|r| f(r)).collect::<Vec<_>>())
    };
    let opt_stat = |records: &[&RunRecord], f: &dyn Fn(&RunRecord) -> Option<f64>| -> Option<Stat> {
        let values: Option<Vec<f64>> = records.iter().map(|r| f(r)).collect();
        values.filter(|v| !v.is_empty()).map(|v| Stat::of(&v))
    };
    let max_runs = of("max", "max");
    let max = MaxResult {
        connections: plan.max_connections,
        throughput_rps: stat(&max_runs, &|r| r.load.throughput_rps),
        p50_us: stat(&max_runs, &|r| r.load.latency_us.p50),
        p99_us: stat(&max_runs, &|r| r.load.latency_us.p99),
        errors: max_runs.iter().map(|r| r.load.errors).sum(),
        proxy_cpu_us_per_req: opt_stat(&max_runs, &|r| r.proxy_cpu_us_per_req),
        proxy_core_busy_pct: opt_stat(&max_runs, &|r| r.proxy_core_busy_pct),
        generator_core_busy_pct: stat(&max_runs, &|r| r.generator_core_busy_pct),
        proxy_peak_rss_mib: opt_stat(&max_runs, &|r| r.proxy_peak_rss_mib),
    };
    // Labels in the order of their first run (ascending rate).
    let mut labels: Vec<String> = Vec::new();
    for run in runs.iter().filter(|r| r.scenario == scenario.name() && r.kind == "rate") {
        if !labels.contains(&run.label) {
            labels.push(run.label.clone());
        }
    }
    let rates = labels
        .iter()
        .map(|label| {
            let records = of("rate", label);
            RateResult {
                label: label.clone(),
                rate: records.first().and_then(|r| r.load.target_rate).unwrap_or(f64::NAN),
                connections: plan.rate_connections,
                achieved_rps: stat(&records, &|r| r.load.throughput_rps),
                p50_us: stat(&records, &|r| r.load.latency_us.p50),
                p99_us: stat(&records, &|r| r.load.latency_us.p99),
                p999_us: stat(&records, &|r| r.load.latency_us.p999),
                send_lag_p99_us: stat(&records, &|r| r.load.send_lag_us.map_or(f64::NAN, |l| l.p99)),
                generator_bound: generator_bound(&records),
                errors: records.iter().map(|r| r.load.errors).sum(),
                unsent: records.iter().map(|r| r.load.unsent).sum(),
                proxy_cpu_us_per_req: opt_stat(&records, &|r| r.proxy_cpu_us_per_req),
                proxy_peak_rss_mib: opt_stat(&records, &|r| r.proxy_peak_rss_mib),
                added_over_direct: None,
            }
        })
        .collect();
    ScenarioResult { name: scenario.name().to_owned(), description: scenario.description().to_owned(), max, rates }
}

/// Whether the generator set the pace in the median repetition (see `RateResult::generator_bound`).
pub fn generator_bound(records: &[&RunRecord]) -> bool {
    let mut flags: Vec<bool> = records
        .iter()
        // Not send lag: requests also wait for a free connection while the proxy stalls, which is
        // the proxy's latency. A saturated generator core is the generator's.
        .map(|r| r.generator_core_busy_pct > 90.0)
        .collect();
    flags.sort();
    flags.get(flags.len() / 2).copied().unwrap_or(false)
}

/// Recomputes what is derived from a results file's runs (generator-bound flags, added latency,
/// ratios, targets) with this version's rules, so an older file can be rendered again.
pub fn rederive(results: &mut report::Results) {
    for scenario in &mut results.scenarios {
        for rate in &mut scenario.rates {
            let records: Vec<&RunRecord> = results
                .runs
                .iter()
                .filter(|r| r.scenario == scenario.name && r.kind == "rate" && r.label == rate.label)
                .collect();
            rate.generator_bound = generator_bound(&records);
        }
    }
    add_latency_over_direct(&mut results.scenarios);
    results.targets = report::evaluate_targets(&results.scenarios, &results.fsync, results.setup.reference_rate);
}

/// Fills `added_over_direct` of every proxy scenario's rates from D's result at the same rate
/// (the same label, or D's "80% of <scenario> max" for the scenario's own high rate).
fn add_latency_over_direct(results: &mut [ScenarioResult]) {
    let Some(direct) = results.iter().find(|s| s.name == "D").cloned() else { return };
    for scenario in results.iter_mut().filter(|s| s.name != "D") {
        let name = scenario.name.clone();
        for rate in &mut scenario.rates {
            let direct_label = if rate.label.ends_with("% of max") {
                rate.label.replace("of max", &format!("of {name} max"))
            } else {
                rate.label.clone()
            };
            if let Some(d) = direct.rate(&direct_label) {
                rate.added_over_direct = Some(Added {
                    p50_us: rate.p50_us.median - d.p50_us.median,
                    p99_us: rate.p99_us.median - d.p99_us.median,
                    p999_us: rate.p999_us.median - d.p999_us.median,
                });
            }
        }
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// Today's date (UTC), `YYYY-MM-DD`: the default results file name.
pub fn today() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!("{:04}-{:02}-{:02}", now.year(), u8::from(now.month()), now.day())
}

/// First line a command prints (stdout, else stderr), or `unknown`.
fn command_version(program: &std::path::Path, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .ok()
        .map(|out| {
            let text = if out.stdout.is_empty() { out.stderr } else { out.stdout };
            String::from_utf8_lossy(&text).lines().next().unwrap_or_default().trim().to_owned()
        })
        .filter(|line| !line.is_empty())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Profiles the proxy of `scenario` with `perf record` while it serves `rate` requests per second
/// for `duration`; returns the flat `perf report` (self time by symbol). The data file is kept at
/// `perf_data` for `perf report -i` afterwards.
pub fn profile(
    env: &Environment,
    scenario: Scenario,
    rate: f64,
    duration: Duration,
    perf_data: &std::path::Path,
    call_graph: bool,
) -> Result<String, BenchError> {
    if !scenario.has_proxy() {
        return Err(BenchError::Invalid("profile a scenario with a proxy (P0, P1, P2 or N), not D".to_owned()));
    }
    let stack = Stack::start(env, scenario)?;
    let pids = stack.proxy_pids().iter().map(u32::to_string).collect::<Vec<_>>().join(",");
    let mut perf = Command::new("perf");
    perf.args(["record", "-F", "1999", "-p", &pids, "-o"]).arg(perf_data);
    if call_graph {
        perf.args(["--call-graph", "dwarf,16384"]);
    }
    perf.stdin(std::process::Stdio::null()).stdout(std::process::Stdio::null());
    let log = stack.dir().join("perf.log");
    let log_file = std::fs::File::create(&log).map_err(|e| BenchError::io("create perf's log", &log, e))?;
    perf.stderr(log_file);
    let mut recorder = crate::procs::Proc::spawn("perf record", &mut perf, &log)?;
    // perf needs a moment to attach before the load starts.
    std::thread::sleep(Duration::from_millis(500));
    recorder.ensure_running()?;
    let load = run_load(env, &stack, Some(rate), 32, Duration::from_secs(1), duration, 1024)?;
    // SIGINT makes perf write its data and exit.
    let _ = Command::new("kill").arg("-INT").arg(recorder.pid().to_string()).status();
    recorder.stop();
    stack.stop();
    let perf_report = |sort: &str, fields: &str, limit: &str| -> Result<String, BenchError> {
        let output = Command::new("perf")
            .args(["report", "--stdio", "--no-children", "--sort", sort, "-F", fields, "--percent-limit", limit, "-i"])
            .arg(perf_data)
            .output()
            .map_err(|source| BenchError::Net { what: "run perf report".to_owned(), source })?;
        // perf pads every line to a huge width and adds comment lines: keep the figures only.
        let text = String::from_utf8_lossy(&output.stdout);
        Ok(text
            .lines()
            .map(str::trim_end)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n"))
    };
    Ok(format!(
        "{} at {rate:.0} req/s: p50 {:.0} µs, p99 {:.0} µs, {} errors\n\nCPU by object:\n{}\n\nCPU by symbol (self time):\n{}",
        scenario.name(),
        load.latency_us.p50,
        load.latency_us.p99,
        load.errors,
        perf_report("dso", "overhead,dso", "0.1")?,
        perf_report("dso,sym", "overhead,dso,sym", "0.4")?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_repetition_starts_with_another_scenario() {
        let all = Scenario::ALL.to_vec();
        let firsts: Vec<Scenario> = (0..5).map(|rep| rotated(&all, rep)[0]).collect();
        assert_eq!(firsts, all);
        assert_eq!(rotated(&all, 1), vec![Scenario::P0, Scenario::P1, Scenario::P2, Scenario::N, Scenario::D]);
    }

    #[test]
    fn high_rate_labels_pair_proxies_with_direct() {
        assert_eq!(high_label(0.8, None), "80% of max");
        assert_eq!(high_label(0.8, Some(Scenario::P1)), "80% of P1 max");
    }
}
