//! Instructions per request (issue 21): a cost measure that does not move with the neighbours'
//! load, to accept or reject a change on a shared machine where wall-clock figures drift.
//!
//! The proxy (keygate or nginx) runs under `valgrind --tool=callgrind --instr-atstart=no`, so
//! that nothing is counted until the load is steady: a warm-up at the same rate runs first
//! (connections, pools, caches, the key fetched), then `callgrind_control --instr=on` switches
//! instrumentation on in every process of the proxy, a fixed-rate load runs, `--instr=off`
//! switches it off and `--dump` writes what was counted. Instructions per request = the instructions of
//! that window (every thread of every proxy process: workers, WAL, shipper, nginx's worker)
//! divided by the requests answered in it. What remains in the window besides requests (timer
//! wake-ups, the shipper's idle polls) is charged to them, as it would be in production.
//!
//! Cycles are not reported: this machine's virtualised CPU exposes no hardware counters to
//! `perf stat` (`instructions:u` and `cycles:u` are "not supported"), and callgrind's cache
//! simulation is a model, not the machine.
//!
//! Under valgrind the proxy runs about 50× slower, so the rate must stay far below its normal
//! maximum (the default 50/s keeps every scenario ahead even on a loaded machine); requests the proxy could
//! not answer in the window are errors and fail the measurement rather than skewing it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::BenchError;
use crate::harness;
use crate::stack::{Environment, Scenario, Stack};

/// What one scenario costs, counted by callgrind.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct InstructionCount {
    /// The scenario's name (P0, P1, P2, N).
    pub scenario: String,
    /// Requests answered with a 2xx in the counted window.
    pub requests: u64,
    /// Instructions executed by every process of the proxy in the window.
    pub instructions: u64,
    /// `instructions / requests`.
    pub instructions_per_request: f64,
    /// The fixed rate of the counted load, requests per second.
    pub rate: f64,
}

/// How a measurement runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Requests per second, during warm-up and counting.
    pub rate: f64,
    /// Warm-up at `rate` before counting starts.
    pub warmup: Duration,
    /// The counted window.
    pub window: Duration,
    /// Body of each request, bytes.
    pub body_bytes: usize,
    /// Keep-alive connections of the load generator (as in the harness's fixed-rate phases, so
    /// that a durable scenario's fsync wait does not hold the generator back).
    pub connections: usize,
    /// Copy the counted window's callgrind dumps here (`<scenario>.callgrind.out.<pid>`), for
    /// `callgrind_annotate`.
    pub keep_dumps: Option<PathBuf>,
}

impl Default for Plan {
    fn default() -> Plan {
        Plan {
            rate: 50.0,
            warmup: Duration::from_secs(3),
            window: Duration::from_secs(10),
            body_bytes: 1024,
            connections: 32,
            keep_dumps: None,
        }
    }
}

/// The valgrind command line the proxy runs under; its outputs go to `out_dir`.
pub fn valgrind_wrapper(out_dir: &Path) -> Vec<String> {
    vec![
        "valgrind".to_owned(),
        "--tool=callgrind".to_owned(),
        // Nothing is counted until `callgrind_control --instr=on` (collection itself cannot be
        // switched from outside; instrumentation can).
        "--instr-atstart=no".to_owned(),
        // nginx's worker is a fork of its master: counted in its own file.
        "--trace-children=yes".to_owned(),
        format!("--callgrind-out-file={}/callgrind.out.%p", out_dir.display()),
        "--quiet".to_owned(),
    ]
}

/// Counts the instructions per request of one scenario. `env.proxy_wrapper` must be empty: the
/// wrapper is set here.
pub fn measure(env: &Environment, scenario: Scenario, plan: &Plan) -> Result<InstructionCount, BenchError> {
    if !scenario.has_proxy() {
        return Err(BenchError::Invalid("count a scenario with a proxy (P0, P1, P2 or N), not D".to_owned()));
    }
    let out_dir = tempfile::Builder::new()
        .prefix(&format!("callgrind-{}-", scenario.name()))
        .tempdir_in(&env.work_dir)
        .map_err(|e| BenchError::io("create callgrind's folder", &env.work_dir, e))?;
    let mut env = env.clone();
    env.proxy_wrapper = valgrind_wrapper(out_dir.path());
    let mut stack = Stack::start(&env, scenario)?;
    let warmup = harness::run_load(
        &env,
        &stack,
        Some(plan.rate),
        plan.connections,
        Duration::ZERO,
        plan.warmup,
        plan.body_bytes,
    )?;
    if warmup.errors > 0 {
        return Err(BenchError::Process(format!(
            "{} under valgrind answered {} of {} warm-up requests with errors: lower --rate",
            scenario.name(),
            warmup.errors,
            warmup.errors + warmup.requests
        )));
    }
    let pids = stack.proxy_pids();
    callgrind_control(&pids, "--instr=on")?;
    let load = harness::run_load(
        &env,
        &stack,
        Some(plan.rate),
        plan.connections,
        Duration::ZERO,
        plan.window,
        plan.body_bytes,
    );
    // Off and dumped whatever the load's outcome, so that the files are complete.
    callgrind_control(&pids, "--instr=off")?;
    callgrind_control(&pids, "--dump")?;
    stack.ensure_running()?;
    stack.stop();
    let load = load?;
    if load.errors > 0 || load.unsent > 0 {
        return Err(BenchError::Process(format!(
            "{} under valgrind: {} errors and {} unsent of {} requests in the counted window: lower --rate",
            scenario.name(),
            load.errors,
            load.unsent,
            load.requests + load.errors + load.unsent
        )));
    }
    if load.requests == 0 {
        return Err(BenchError::Process(format!("{}: no request answered in the counted window", scenario.name())));
    }
    let (instructions, dumps) = dumped_instructions(out_dir.path())?;
    if let Some(keep) = &plan.keep_dumps {
        std::fs::create_dir_all(keep).map_err(|e| BenchError::io("create the dump folder", keep, e))?;
        for dump in dumps {
            let name = dump.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let to = keep.join(format!("{}.{}", scenario.name(), name.trim_end_matches(".1")));
            std::fs::copy(&dump, &to).map_err(|e| BenchError::io("keep a callgrind dump", &to, e))?;
        }
    }
    Ok(InstructionCount {
        // `P0+anomalies`: keygate ran live anomaly detection (`--anomalies`).
        scenario: if env.anomalies && matches!(scenario, Scenario::P0 | Scenario::P1 | Scenario::P2) {
            format!("{}+anomalies", scenario.name())
        } else {
            scenario.name().to_owned()
        },
        requests: load.requests,
        instructions,
        instructions_per_request: instructions as f64 / load.requests as f64,
        rate: plan.rate,
    })
}

fn callgrind_control(pids: &[u32], action: &str) -> Result<(), BenchError> {
    for pid in pids {
        let output = Command::new("callgrind_control").arg(action).arg(pid.to_string()).output().map_err(|source| {
            BenchError::Net { what: "run callgrind_control (is valgrind installed?)".to_owned(), source }
        })?;
        if !output.status.success() {
            return Err(BenchError::Process(format!(
                "callgrind_control {action} {pid} failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )));
        }
    }
    Ok(())
}

/// Sum of the instructions in the dumps that `--dump` wrote (files `callgrind.out.<pid>.<n>`,
/// one per process; the final dump at exit, `callgrind.out.<pid>`, holds nothing collected since
/// collection was off and is ignored).
fn dumped_instructions(dir: &Path) -> Result<(u64, Vec<PathBuf>), BenchError> {
    let entries = std::fs::read_dir(dir).map_err(|e| BenchError::io("read callgrind's folder", dir, e))?;
    let mut total = 0u64;
    let mut dumps = Vec::new();
    for entry in entries {
        let path: PathBuf = entry.map_err(|e| BenchError::io("read callgrind's folder", dir, e))?.path();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        // callgrind.out.<pid>.<dump number>: the explicit dumps.
        let is_dump = name.strip_prefix("callgrind.out.").is_some_and(|rest| rest.split('.').count() == 2);
        if !is_dump {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| BenchError::io("read a callgrind dump", &path, e))?;
        total =
            total.saturating_add(totals_of(&text).ok_or_else(|| {
                BenchError::Invalid(format!("{} has no `totals:` or `summary:` line", path.display()))
            })?);
        dumps.push(path);
    }
    if dumps.is_empty() {
        return Err(BenchError::Process(format!("callgrind wrote no dump in {}", dir.display())));
    }
    Ok((total, dumps))
}

/// The instruction count of one callgrind output file: its `totals:` line (or `summary:` in
/// older formats), whose first figure is `Ir` (the only event without cache simulation).
pub fn totals_of(text: &str) -> Option<u64> {
    let line =
        text.lines().find(|l| l.starts_with("totals:")).or_else(|| text.lines().find(|l| l.starts_with("summary:")))?;
    line.split_once(':')?.1.split_whitespace().next()?.parse().ok()
}

/// A Markdown table of counts, with the ratio to nginx where it was measured.
pub fn markdown(counts: &[InstructionCount]) -> String {
    let nginx = counts.iter().find(|c| c.scenario == "N").map(|c| c.instructions_per_request);
    let mut out = String::from(
        "| scenario | requests counted | instructions / request | × nginx |\n| --- | ---: | ---: | ---: |\n",
    );
    for count in counts {
        let ratio = nginx
            .filter(|n| *n > 0.0)
            .map_or("–".to_owned(), |n| format!("{:.2}", count.instructions_per_request / n));
        out.push_str(&format!(
            "| {} | {} | {:.0} | {} |\n",
            count.scenario, count.requests, count.instructions_per_request, ratio
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_are_read_from_callgrind_output() {
        let text = "version: 1\ncreator: callgrind-3.19.0\nevents: Ir\n\nfn=(1) main\n0 5\ntotals: 123456\n";
        assert_eq!(totals_of(text), Some(123_456));
        assert_eq!(totals_of("events: Ir\nsummary: 42 7\n"), Some(42));
        assert_eq!(totals_of("events: Ir\n"), None);
        assert_eq!(totals_of("totals: x\n"), None);
    }

    #[test]
    fn only_the_explicit_dumps_are_summed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("callgrind.out.10.1"), "totals: 1000\n").expect("write");
        std::fs::write(dir.path().join("callgrind.out.11.1"), "totals: 500\n").expect("write");
        // The dump at exit: collected nothing, but must not be counted either way.
        std::fs::write(dir.path().join("callgrind.out.10"), "totals: 999999\n").expect("write");
        let (total, dumps) = dumped_instructions(dir.path()).expect("sum");
        assert_eq!(total, 1500);
        assert_eq!(dumps.len(), 2);
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(dumped_instructions(empty.path()).is_err());
    }

    #[test]
    fn the_table_gives_ratios_to_nginx() {
        let count = |scenario: &str, per: f64| InstructionCount {
            scenario: scenario.to_owned(),
            requests: 1000,
            instructions: (per * 1000.0) as u64,
            instructions_per_request: per,
            rate: 100.0,
        };
        let table = markdown(&[count("P0", 300_000.0), count("N", 100_000.0)]);
        assert!(table.contains("| P0 | 1000 | 300000 | 3.00 |"), "{table}");
        assert!(table.contains("| N | 1000 | 100000 | 1.00 |"), "{table}");
    }
}
