//! `bench-limits`: what the Redis limit store adds to a request, measured on keygate's own store
//! code (`keygate_limits::RedisStore`, the same Lua scripts and connection manager as the proxy).
//!
//! Open loop: `--rate` requests per second for `--duration-s`, each one the store calls a
//! rate-limited, budgeted money-moving request makes (`acquire`, then `charge`), latency from the
//! intended start (so a stall is not hidden by coordinated omission). Then closed loop with
//! `--concurrency` tasks for the same time: the store operations per second one keygate instance
//! can do. Prints one JSON report on stdout. The password travels in `BENCH_REDIS_PASSWORD_FILE`
//! (a file path), never on the command line.
#![allow(clippy::print_stdout)] // The JSON report on stdout is its interface.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hdrhistogram::Histogram;
use keygate_limits::{BudgetKey, ChargeRequest, LimitStore, RateSpec, RedisStore, RedisStoreConfig};

#[derive(Debug, Parser)]
#[command(about = "Latency and throughput of keygate's Redis limit store")]
struct Args {
    /// `host:port` of the Redis.
    #[arg(long)]
    redis: String,
    /// Requests per second in the open-loop phase.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Seconds of each phase.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Tasks of the closed-loop phase.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
}

fn main() {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("bench-limits: cannot start the runtime: {error}");
            std::process::exit(1);
        }
    };
    match runtime.block_on(run(args)) {
        Ok(json) => println!("{json}"),
        Err(error) => {
            eprintln!("bench-limits: {error}");
            std::process::exit(1);
        }
    }
}

fn budget(n: u64) -> ChargeRequest {
    ChargeRequest {
        // A handful of services, as in production: not one hot key.
        key: BudgetKey {
            service: format!("bench-{}", n % 8),
            currency: "usd".into(),
            window: Duration::from_secs(3600),
        },
        max: i64::MAX / 2,
        amount: 1000,
        force: false,
    }
}

const RATE: RateSpec = RateSpec { per_second: 1_000_000.0, burst: 1_000_000 };

/// One request's store calls; its latency in microseconds.
async fn one(store: &RedisStore, n: u64) -> Result<(), String> {
    store.acquire(&format!("bench-{}", n % 8), RATE).await.map_err(|e| e.to_string())?;
    store.charge(&budget(n)).await.map_err(|e| e.to_string())?;
    Ok(())
}

fn percentiles(histogram: &Histogram<u64>) -> serde_json::Value {
    serde_json::json!({
        "count": histogram.len(),
        "p50_us": histogram.value_at_quantile(0.50),
        "p90_us": histogram.value_at_quantile(0.90),
        "p99_us": histogram.value_at_quantile(0.99),
        "p999_us": histogram.value_at_quantile(0.999),
        "max_us": histogram.max(),
    })
}

async fn run(args: Args) -> Result<String, String> {
    let mut yaml = format!("address: {}\nkey_prefix: \"bench:\"\n", args.redis);
    if let Ok(file) = std::env::var("BENCH_REDIS_PASSWORD_FILE") {
        yaml.push_str(&format!("password: \"file://{file}\"\n"));
    }
    let config: RedisStoreConfig = serde_saphyr::from_str(&yaml).map_err(|e| format!("config: {e}"))?;
    let secrets = keygate_secrets::SecretStore::new(&keygate_secrets::SecretsConfig::default())
        .await
        .map_err(|e| e.to_string())?;
    let store =
        Arc::new(RedisStore::connect(&config, Duration::from_secs(1), &secrets).await.map_err(|e| e.to_string())?);
    store.ping().await.map_err(|e| e.to_string())?;
    let duration = Duration::from_secs_f64(args.duration_s);

    // Open loop at --rate: each request starts at its intended time on its own task.
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).map_err(|e| e.to_string())?;
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let started = Instant::now();
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    let mut n = 0u64;
    while started.elapsed() < duration {
        let intended = started + interval * u32::try_from(n).unwrap_or(u32::MAX);
        tokio::time::sleep_until(intended.into()).await;
        let store = store.clone();
        let sender = sender.clone();
        tokio::spawn(async move {
            let result = one(&store, n).await;
            let _ = sender.send((intended.elapsed(), result));
        });
        n += 1;
    }
    drop(sender);
    let mut errors = 0u64;
    while let Some((elapsed, result)) = receiver.recv().await {
        match result {
            Ok(()) => {
                let _ = histogram.record(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX).max(1));
            }
            Err(_) => errors += 1,
        }
    }
    let open = percentiles(&histogram);

    // Closed loop: as fast as --concurrency tasks go.
    let started = Instant::now();
    let tasks: Vec<_> = (0..args.concurrency)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut done = 0u64;
                let mut n = task as u64;
                while started.elapsed() < duration {
                    if one(&store, n).await.is_ok() {
                        done += 1;
                    }
                    n += 7;
                }
                done
            })
        })
        .collect();
    let mut done = 0u64;
    for task in tasks {
        done += task.await.map_err(|e| e.to_string())?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let report = serde_json::json!({
        "store": "redis",
        "calls_per_request": ["acquire", "charge"],
        "open_loop": { "rate": args.rate, "seconds": args.duration_s, "errors": errors, "latency": open },
        "closed_loop": { "concurrency": args.concurrency, "requests_per_second": (done as f64 / seconds).round() },
    });
    serde_json::to_string_pretty(&report).map_err(|e| e.to_string())
}
