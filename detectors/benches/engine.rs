//! The detectors' cost per input, as keygate's detector task pays it: an engine that learned five
//! weeks of generated history (three services, seasonality, several currencies) is fed the sixth
//! week, every request and webhook event of it in time order. Reported per input
//! (`Throughput::Elements`); docs/benchmarks.md records the figures. Run with
//! `cargo bench -p keygate-detectors --bench engine`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use keygate_detectors::simulate::{self, HistoryConfig};
use keygate_detectors::{AnomaliesConfig, Engine, Input};

const WEEK_US: i64 = 7 * 24 * 3_600_000_000;

fn engine(c: &mut Criterion) {
    let config = AnomaliesConfig::default();
    let history = simulate::generate(&HistoryConfig { weeks: 6, plant: false, ..HistoryConfig::default() });
    let cut = history.start_us + 5 * WEEK_US;
    let (learn, live): (Vec<&Input>, Vec<&Input>) = history.inputs.iter().partition(|i| i.at_us() < cut);
    let mut learned = Engine::new(&config);
    for input in &learn {
        learned.observe(input);
    }
    let state = learned.state();
    let mut group = c.benchmark_group("detectors");
    group.throughput(Throughput::Elements(live.len() as u64));
    group.sample_size(10);
    group.bench_function("observe_one_week_after_five_learned", |b| {
        b.iter_batched(
            || Engine::with_state(&config, state.clone()),
            |mut engine| {
                let mut alerts = 0usize;
                for input in &live {
                    alerts += engine.observe(input).len();
                }
                alerts
            },
            BatchSize::LargeInput,
        );
    });
    group.finish();
}

criterion_group!(benches, engine);
criterion_main!(benches);
