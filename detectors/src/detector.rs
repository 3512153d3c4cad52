//! The [`Detector`] trait: its documentation is the contract every detector keeps.

use crate::alert::{Alert, DetectorKind};
use crate::input::Input;

/// One explainable statistic over each service's own history.
///
/// Contract (the conformance tests in `conformance.rs` run it against every detector):
///
/// - **Pure and deterministic**: no I/O, no clock, no randomness. The same inputs in the same
///   order give the same alerts and the same state. Time is the inputs' own (`at_us`) and the
///   `now_us` of [`Detector::advance`], so a batch run over the lake and a live run agree.
/// - **Time goes forward**: inputs arrive roughly in time order. An input older than the bucket
///   a series is filling is counted in that bucket; closed buckets are never reopened and time
///   never goes backwards, so a late input cannot raise an alert for the past twice.
/// - **Per service**: a service's baseline is learned from that service's inputs only; one
///   service's traffic never raises an alert for another.
/// - **Learns before it judges**: every detector has a warm-up (weeks per hour-of-week slot,
///   samples, buckets, a learning period); before it, it raises nothing.
/// - **Explained and cited**: every alert says what was expected and what was seen, and cites
///   the `event_id`s that triggered it (bounded by `max_cited`); a silence cites the last record
///   before it, when there is one.
/// - **Modes**: in `shadow` mode a detector emits exactly the alerts it would in `alert` mode,
///   marked [`crate::Mode::Shadow`], and learns exactly the same; consumers only record those.
/// - **Not poisoned by what it flags**: an input or bucket that raised an alert is not learned
///   as normal.
/// - **Bounded**: memory per series is bounded, and the number of series by `max_series`;
///   inputs for series beyond it are dropped and counted, never a panic or an unbounded map.
/// - **One alert per episode**: a surge or silence that lasts several buckets raises once, when
///   it starts; the next alert needs a normal bucket in between.
pub trait Detector {
    fn kind(&self) -> DetectorKind;

    /// Takes one input; pushes any alert it raises onto `out`.
    fn observe(&mut self, input: &Input, out: &mut Vec<Alert>);

    /// Moves the detector's clock to `now_us`, closing the buckets that ended before it (this is
    /// where silences are found). Called by the engine before each input and on clock ticks.
    fn advance(&mut self, now_us: i64, out: &mut Vec<Alert>);

    /// Inputs ignored because `max_series` was reached.
    fn dropped_inputs(&self) -> u64;
}
