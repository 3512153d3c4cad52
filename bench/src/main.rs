//! `keygate-bench`: runs keygate's end-to-end benchmark (scenarios D, P0, P1, P2 and N) and
//! writes its results. `bench/run.sh` builds the release binaries and calls `keygate-bench full`.
//!
//! - `keygate-bench full` — the real run (about 20 minutes): results JSON, Markdown summary on
//!   stdout, and with `--docs` the generated block of docs/benchmarks.md.
//! - `keygate-bench smoke` — every scenario at low rates for about a second each (the test suite
//!   runs it with debug binaries so that the harness cannot rot).
//! - `keygate-bench fsync` — only this machine's fsync latency in a folder.
#![allow(clippy::print_stdout)] // The summary on stdout is its interface.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use keygate_bench::harness::{self, Plan};
use keygate_bench::stack::{self, Environment};
use keygate_bench::{BenchError, report};

#[derive(Debug, Parser)]
#[command(about = "keygate's end-to-end benchmark: direct, keygate (audit off/sync/async) and nginx, side by side")]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// The real benchmark: 3 repetitions of every scenario, fixed rates and maximum throughput.
    Full(RunArgs),
    /// Every scenario at low rates for about a second each: checks the harness, measures nothing.
    Smoke(RunArgs),
    /// Profile one scenario's proxy with `perf record` under a fixed rate; prints the flat profile.
    Profile {
        /// P0, P1, P2 or N.
        #[arg(long, default_value = "P0")]
        scenario: String,
        /// Requests per second during the profile.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        /// Seconds of load.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Where perf writes its data (kept for `perf report -i`).
        #[arg(long, default_value = "bench-profile.data")]
        perf_data: PathBuf,
        /// Record call graphs (DWARF unwinding; larger data).
        #[arg(long)]
        call_graph: bool,
        #[command(flatten)]
        common: RunArgs,
    },
    /// Instructions per request of each scenario's proxy, counted by callgrind over a fixed-rate
    /// window after a warm-up: a cost that does not move with the machine's load.
    Instructions {
        /// Scenarios, comma-separated (P0, P1, P2, N).
        #[arg(long, default_value = "P0,P1,N")]
        scenarios: String,
        /// Requests per second (the proxy runs about 50× slower under valgrind).
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        /// Seconds of counted load.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Also write the counts as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
        /// Keep the counted window's callgrind dumps in this folder (for `callgrind_annotate`).
        #[arg(long)]
        keep_dumps: Option<PathBuf>,
        #[command(flatten)]
        common: RunArgs,
    },
    /// Render an existing results file again (derived figures recomputed): summary on stdout,
    /// the file rewritten, and with --docs the Markdown block.
    Render {
        /// A results file written by `full` or `smoke`.
        #[arg(long)]
        results: PathBuf,
        /// Rewrite the generated block of this Markdown file.
        #[arg(long)]
        docs: Option<PathBuf>,
    },
    /// This machine's fsync latency (append + fdatasync) in a folder.
    Fsync {
        /// The folder (put it on the WAL's filesystem).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        #[arg(long, default_value_t = 2000)]
        samples: u64,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// Folder holding `keygate`, `bench-upstream` and `bench-load` (default: this program's).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// The nginx binary (default: `nginx` on PATH, else /usr/sbin/nginx).
    #[arg(long)]
    nginx: Option<PathBuf>,
    /// Where stacks keep their files, the WAL included; the fsync probe runs there too. Put it on
    /// the filesystem you want the WAL measured on (default: the system's temporary folder).
    #[arg(long)]
    work_dir: Option<PathBuf>,
    /// Results file (default for `full`: bench/results/<date>.json).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Rewrite the generated block of this Markdown file (docs/benchmarks.md).
    #[arg(long)]
    docs: Option<PathBuf>,
    /// Core for keygate and nginx.
    #[arg(long, default_value_t = 0)]
    proxy_core: usize,
    /// Core for the load generator and the upstream.
    #[arg(long, default_value_t = 1)]
    generator_core: usize,
    /// Do not pin processes to cores (machines with one core).
    #[arg(long)]
    no_pin: bool,
    /// The upstream speaks TLS (keygate and nginx verify it against its CA).
    #[arg(long)]
    upstream_tls: bool,
    /// The upstream waits this long before each answer (Stripe's own latency), milliseconds.
    #[arg(long, default_value_t = 0)]
    upstream_delay_ms: u64,
    /// Repetitions of each scenario (default: 3 for full, 1 for smoke).
    #[arg(long)]
    reps: Option<usize>,
    /// keygate (P0, P1, P2) runs live anomaly detection, every detector at its defaults: what
    /// the detectors cost the request path, against a run without it.
    #[arg(long)]
    anomalies: bool,
}

fn main() {
    let cli = Cli::parse();
    let result = match cli.command {
        Commands::Full(args) => run(Plan::full(), args),
        Commands::Smoke(args) => run(Plan::smoke(), args),
        Commands::Profile { scenario, rate, seconds, perf_data, call_graph, common } => {
            profile(&scenario, rate, seconds, &perf_data, call_graph, common)
        }
        Commands::Instructions { scenarios, rate, seconds, json, keep_dumps, common } => {
            instructions(&scenarios, rate, seconds, json.as_deref(), keep_dumps, common)
        }
        Commands::Render { results, docs } => render(&results, docs.as_deref()),
        Commands::Fsync { dir, samples } => keygate_bench::fsync::measure(&dir, samples, 4096).and_then(|stats| {
            serde_json::to_string_pretty(&stats)
                .map(|json| println!("{json}"))
                .map_err(|source| BenchError::Json { what: "write the fsync stats".to_owned(), source })
        }),
    };
    if let Err(error) = result {
        eprintln!("keygate-bench: {error}");
        std::process::exit(1);
    }
}

fn find_nginx() -> Result<PathBuf, BenchError> {
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join("nginx")).collect::<Vec<_>>())
        .unwrap_or_default();
    on_path.into_iter().chain([PathBuf::from("/usr/sbin/nginx")]).find(|candidate| candidate.is_file()).ok_or_else(
        || {
            BenchError::Process(
                "nginx (scenario N) was not found on PATH or in /usr/sbin: run scripts/install-deb.sh nginx, or give --nginx"
                    .to_owned(),
            )
        },
    )
}

fn render(path: &Path, docs: Option<&Path>) -> Result<(), BenchError> {
    let text = std::fs::read_to_string(path).map_err(|e| BenchError::io("read the results", path, e))?;
    let mut results: report::Results = serde_json::from_str(&text)
        .map_err(|source| BenchError::Json { what: format!("parse {}", path.display()), source })?;
    harness::rederive(&mut results);
    let markdown = report::markdown(&results);
    println!("{markdown}");
    let json = serde_json::to_string_pretty(&results)
        .map_err(|source| BenchError::Json { what: "write the results".to_owned(), source })?;
    std::fs::write(path, json + "\n").map_err(|e| BenchError::io("write the results", path, e))?;
    if let Some(docs) = docs {
        report::update_docs(docs, &markdown)?;
    }
    Ok(())
}

fn profile(
    scenario: &str,
    rate: f64,
    seconds: f64,
    perf_data: &Path,
    call_graph: bool,
    args: RunArgs,
) -> Result<(), BenchError> {
    let scenario = stack::Scenario::parse(scenario)
        .ok_or_else(|| BenchError::Invalid(format!("--scenario {scenario:?}: one of P0, P1, P2, N")))?;
    let duration = Duration::try_from_secs_f64(seconds)
        .map_err(|_| BenchError::Invalid("--seconds must be a positive number".to_owned()))?;
    let (env, _work) = environment(&args)?;
    let text = harness::profile(&env, scenario, rate, duration, perf_data, call_graph)?;
    println!("{text}");
    Ok(())
}

fn instructions(
    scenarios: &str,
    rate: f64,
    seconds: f64,
    json: Option<&Path>,
    keep_dumps: Option<PathBuf>,
    args: RunArgs,
) -> Result<(), BenchError> {
    let scenarios = scenarios
        .split(',')
        .map(|name| {
            stack::Scenario::parse(name.trim())
                .filter(|s| s.has_proxy())
                .ok_or_else(|| BenchError::Invalid(format!("--scenarios: {name:?} is not one of P0, P1, P2, N")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let window = Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| BenchError::Invalid("--seconds must be a positive number".to_owned()))?;
    if !(rate.is_finite() && rate > 0.0) {
        return Err(BenchError::Invalid("--rate must be a positive number".to_owned()));
    }
    let plan = keygate_bench::instructions::Plan { rate, window, keep_dumps, ..Default::default() };
    let (env, _work) = environment(&args)?;
    let mut counts = Vec::new();
    for scenario in scenarios {
        eprintln!("keygate-bench: counting {} under callgrind at {rate}/s for {seconds}s", scenario.name());
        counts.push(keygate_bench::instructions::measure(&env, scenario, &plan)?);
    }
    println!("{}", keygate_bench::instructions::markdown(&counts));
    if let Some(path) = json {
        let text = serde_json::to_string_pretty(&counts)
            .map_err(|source| BenchError::Json { what: "write the counts".to_owned(), source })?;
        std::fs::write(path, text + "\n").map_err(|e| BenchError::io("write the counts", path, e))?;
    }
    Ok(())
}

/// The shared environment of a run, and the temporary work folder that must outlive it.
fn environment(args: &RunArgs) -> Result<(Environment, tempfile::TempDir), BenchError> {
    let bin_dir = match args.bin_dir.clone() {
        Some(dir) => dir,
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(Path::to_path_buf))
            .ok_or_else(|| BenchError::Invalid("cannot tell where this program is: give --bin-dir".to_owned()))?,
    };
    for name in ["keygate", "bench-upstream", "bench-load"] {
        if !bin_dir.join(name).is_file() {
            return Err(BenchError::Process(format!(
                "{} not found: build it first (bench/run.sh does `cargo build --release -p keygate -p keygate-bench`)",
                bin_dir.join(name).display()
            )));
        }
    }
    let nginx = match args.nginx.clone() {
        Some(path) => path,
        None => find_nginx()?,
    };
    let work_parent = args.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&work_parent).map_err(|e| BenchError::io("create the work folder", &work_parent, e))?;
    let work = tempfile::Builder::new()
        .prefix("keygate-bench-")
        .tempdir_in(&work_parent)
        .map_err(|e| BenchError::io("create the work folder", &work_parent, e))?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = !args.no_pin && cores >= 2;
    if !args.no_pin && !pin {
        eprintln!("keygate-bench: one core only: processes are not pinned");
    }
    let keygate = bin_dir.join("keygate");
    let (token, token_hash) = stack::mint_token(&keygate)?;
    let env = Environment {
        bin_dir,
        nginx,
        work_dir: work.path().to_path_buf(),
        proxy_core: pin.then_some(args.proxy_core),
        generator_core: pin.then_some(args.generator_core),
        upstream_tls: args.upstream_tls,
        upstream_delay: Duration::from_millis(args.upstream_delay_ms),
        token,
        token_hash,
        // A test-mode-shaped key the upstream requires: proves the proxies inject it.
        stripe_key: "sk_test_51BenchKeygateInjectedKey000000000000000000000000000000".to_owned(),
        proxy_wrapper: Vec::new(),
        anomalies: args.anomalies,
    };
    Ok((env, work))
}

fn run(mut plan: Plan, args: RunArgs) -> Result<(), BenchError> {
    if let Some(reps) = args.reps {
        plan.reps = reps.max(1);
    }
    let (env, _work) = environment(&args)?;
    let results = harness::run(&env, &plan, &mut |line| eprintln!("keygate-bench: {line}"))?;

    let markdown = report::markdown(&results);
    println!("{markdown}");
    let out = args.out.or_else(|| {
        (plan.mode == "full").then(|| PathBuf::from("bench/results").join(format!("{}.json", harness::today())))
    });
    if let Some(out) = out {
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| BenchError::io("create the results folder", parent, e))?;
        }
        let json = serde_json::to_string_pretty(&results)
            .map_err(|source| BenchError::Json { what: "write the results".to_owned(), source })?;
        std::fs::write(&out, json + "\n").map_err(|e| BenchError::io("write the results", &out, e))?;
        eprintln!("keygate-bench: results written to {}", out.display());
    }
    if let Some(docs) = args.docs {
        report::update_docs(&docs, &markdown)?;
        eprintln!("keygate-bench: {} updated", docs.display());
    }
    Ok(())
}
