//! keygate's end-to-end benchmark harness (issue 7): how much keygate costs compared with calling
//! the upstream directly and with nginx as the reference proxy, on one machine, side by side.
//!
//! - [`upstream`] — the fake Stripe upstream (`bench-upstream`): fixed Stripe-shaped JSON,
//!   keep-alive, plain HTTP or TLS, an optional fixed delay.
//! - [`loadgen`] — the open-loop load generator (`bench-load`) that corrects for coordinated
//!   omission, and its closed-loop maximum-throughput mode.
//! - [`stack`] — the scenarios (D, P0, P1, P2, N) and the processes each starts, pinned to cores.
//! - [`harness`] — the plan (full or smoke), repetitions in rotated order, aggregation.
//! - [`report`] — the results file, the targets, the Markdown block of docs/benchmarks.md.
//! - [`fsync`], [`procstat`] — this machine's fsync latency; CPU time and peak RSS from /proc.
//! - [`instructions`] — instructions per request under callgrind, a cost that does not move
//!   with the neighbours' load.
//!
//! Invariants: every process the harness starts is stopped when its owner drops; tokens and keys
//! never appear in output, command lines or `Debug` (they travel in environment variables, and in
//! the configuration files of a temporary folder that is removed afterwards).

#![cfg_attr(test, allow(clippy::expect_used, clippy::unwrap_used))]

pub mod error;
pub mod fsync;
pub mod harness;
pub mod instructions;
pub mod loadgen;
pub mod procs;
pub mod procstat;
pub mod report;
pub mod stack;
pub mod stripe_json;
pub mod tls;
pub mod upstream;

pub use error::BenchError;
