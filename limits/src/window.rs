//! The arithmetic of budgets and rate limits, in one place: the in-memory and local stores run
//! exactly this code, and the Redis store's Lua scripts (`redis.rs`) are a line-for-line
//! translation of it, held to it by the conformance suite (`tests/conformance.rs`).
//!
//! Time is in microseconds of the store's clock: the wall clock for the local store (so that a
//! window means the same after a restart), Redis's `TIME` for the Redis store (one clock for
//! every replica), a [`ManualClock`] in tests and `keygate policy test`.
//!
//! **Budget window.** A budget's window of length `W` is divided into [`SLOTS`] slots of
//! `S = W / SLOTS` (at least 1 µs). A charge at time `t` is added to slot `⌊t / S⌋`. What is spent
//! at time `t` is the sum of every slot numbered `⌊t / S⌋ − SLOTS` or later, so an amount counts
//! for at least `W` and at most `W + S` after it was charged: a budget never forgets spending
//! early, and forgets it at most 1/60 of the window late. Slots *after* the current one (a clock
//! that stepped back) are counted too: a clock step never un-spends money.
//!
//! **Boundary.** A charge is allowed when `spent + amount ≤ max`: a budget of 100 allows exactly
//! one charge of 100, or 100 charges of 1; the first charge that would make the total exceed the
//! ceiling is refused, and refused charges count nothing.
//!
//! **Rate limit (GCRA).** A rate of `r` per second with bursts of `b` has an emission interval
//! `T = ⌈10⁶ / r⌉ µs` and keeps one number, the theoretical arrival time `tat`. A request at `t`
//! is allowed when `max(tat, t) − t ≤ (b − 1)·T`, and then `tat = max(tat, t) + T`; otherwise it
//! is refused with `retry_after = max(tat, t) − t − (b − 1)·T`. This is the token bucket of
//! capacity `b` refilled at `r` per second: `b` requests at once after a pause, then one per `T`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Number of slots a budget window is divided into.
pub const SLOTS: u64 = 60;

/// A store's source of time, in microseconds.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Microseconds since this clock's origin.
    fn now_micros(&self) -> u64;
}

/// The wall clock (microseconds since the Unix epoch): what the local store counts in, so that a
/// window keeps its meaning across restarts.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_micros(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that tests advance by hand, so rate limit and budget tests need no sleeping.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    micros: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock at time zero.
    pub fn new() -> ManualClock {
        ManualClock::default()
    }

    /// Moves the clock forward.
    pub fn advance(&self, by: Duration) {
        let by = u64::try_from(by.as_micros()).unwrap_or(u64::MAX);
        self.micros.fetch_add(by, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_micros(&self) -> u64 {
        self.micros.load(Ordering::SeqCst)
    }
}

/// Microseconds in a duration, saturating.
pub fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}

/// The length of one slot of a budget window, in microseconds.
pub fn slot_micros(window: Duration) -> u64 {
    (micros(window) / SLOTS).max(1)
}

/// What a budget check-and-charge found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChargeResult {
    /// What was spent in the window before this charge.
    pub spent: i64,
    /// The charge would make the total exceed the ceiling.
    pub exceeded: bool,
    /// The slot the amount went into, when it was charged (allowed, or forced).
    pub charged_slot: Option<u64>,
}

/// One budget's spending: slot number → amount, for the slots still in the window.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BudgetWindow {
    slots: BTreeMap<u64, i64>,
}

impl BudgetWindow {
    /// An empty window.
    pub fn new() -> BudgetWindow {
        BudgetWindow::default()
    }

    /// Drops slots that left the window and returns what the rest hold.
    fn prune_and_sum(&mut self, current: u64) -> i64 {
        let oldest = current.saturating_sub(SLOTS);
        self.slots.retain(|slot, _| *slot >= oldest);
        self.slots.values().fold(0i64, |sum, v| sum.saturating_add(*v))
    }

    /// Check-and-charge: adds `amount` at `now` if the window's total stays within `max`, or
    /// always when `force` (the request goes through anyway, as in report mode).
    pub fn charge(&mut self, now: u64, window: Duration, max: i64, amount: i64, force: bool) -> ChargeResult {
        let amount = amount.max(0);
        let current = now / slot_micros(window);
        let spent = self.prune_and_sum(current);
        let exceeded = spent.saturating_add(amount) > max;
        if exceeded && !force {
            return ChargeResult { spent, exceeded, charged_slot: None };
        }
        if amount > 0 {
            let entry = self.slots.entry(current).or_insert(0);
            *entry = entry.saturating_add(amount);
        }
        ChargeResult { spent, exceeded, charged_slot: Some(current) }
    }

    /// Gives back `amount` charged into `slot`, if that slot is still in the window (an amount
    /// whose slot has left the window no longer counts anyway). Never below zero.
    pub fn refund(&mut self, slot: u64, amount: i64) {
        if let Some(value) = self.slots.get_mut(&slot) {
            *value = value.saturating_sub(amount.max(0));
            if *value <= 0 {
                self.slots.remove(&slot);
            }
        }
    }

    /// What is spent in the window at `now`.
    pub fn spent(&self, now: u64, window: Duration) -> i64 {
        let oldest = (now / slot_micros(window)).saturating_sub(SLOTS);
        self.slots.range(oldest..).fold(0i64, |sum, (_, v)| sum.saturating_add(*v))
    }

    /// Whether nothing in the window is left at `now` (the state can be forgotten).
    pub fn is_empty_at(&self, now: u64, window: Duration) -> bool {
        let oldest = (now / slot_micros(window)).saturating_sub(SLOTS);
        self.slots.range(oldest..).next().is_none()
    }

    /// The slots as (slot, amount) pairs, for storage.
    pub fn entries(&self) -> impl Iterator<Item = (u64, i64)> + '_ {
        self.slots.iter().map(|(s, v)| (*s, *v))
    }

    /// A window from stored (slot, amount) pairs.
    pub fn from_entries(entries: impl IntoIterator<Item = (u64, i64)>) -> BudgetWindow {
        BudgetWindow { slots: entries.into_iter().filter(|(_, v)| *v > 0).collect() }
    }
}

/// The emission interval of a rate, in microseconds (rounded up: never faster than configured).
pub fn emission_interval_micros(per_second: f64) -> u64 {
    if per_second.is_finite() && per_second > 0.0 {
        // `as` saturates; 1e6 / per_second is at least 1 for the rates a policy allows (≤ 1e6).
        ((1_000_000.0 / per_second).ceil() as u64).max(1)
    } else {
        u64::MAX
    }
}

/// One rate limiter's state: the theoretical arrival time of the next request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Gcra {
    tat: u64,
}

/// What a rate-limit acquisition found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    /// The request may go on.
    Allowed,
    /// Over the limit: the next request can be allowed this much later.
    Limited { retry_after_micros: u64 },
}

impl Gcra {
    /// Takes one request at `now` (see the module docs).
    pub fn acquire(&mut self, now: u64, per_second: f64, burst: u32) -> Acquired {
        let interval = emission_interval_micros(per_second);
        let tolerance = interval.saturating_mul(u64::from(burst.max(1)) - 1);
        let tat = self.tat.max(now);
        let ahead = tat - now;
        if ahead > tolerance {
            return Acquired::Limited { retry_after_micros: ahead - tolerance };
        }
        self.tat = tat.saturating_add(interval);
        Acquired::Allowed
    }

    /// Whether the limiter is back to a full burst at `now` (the state can be forgotten).
    pub fn is_idle_at(&self, now: u64) -> bool {
        self.tat <= now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000;

    #[test]
    fn budget_rolls_over_after_the_window() {
        let hour = Duration::from_secs(3600);
        let mut b = BudgetWindow::new();
        let t0 = 10 * 3600 * SECOND;
        assert!(!b.charge(t0, hour, 1000, 600, false).exceeded);
        assert!(!b.charge(t0 + 1, hour, 1000, 400, false).exceeded);
        let over = b.charge(t0 + 2, hour, 1000, 1, false);
        assert_eq!((over.exceeded, over.spent, over.charged_slot), (true, 1000, None));
        // Not yet a full window later: still spent.
        assert_eq!(b.charge(t0 + 3599 * SECOND, hour, 1000, 1, false).spent, 1000);
        // A window and a slot later: all forgotten.
        let later = t0 + 3600 * SECOND + 61 * SECOND;
        assert_eq!(b.spent(later, hour), 0);
        assert!(b.is_empty_at(later, hour));
        assert!(!b.charge(later, hour, 1000, 1000, false).exceeded);
    }

    #[test]
    fn forced_charges_count_even_over_the_ceiling_and_refunds_give_back() {
        let minute = Duration::from_secs(60);
        let mut b = BudgetWindow::new();
        let forced = b.charge(0, minute, 100, 150, true);
        assert_eq!((forced.exceeded, forced.spent, forced.charged_slot), (true, 0, Some(0)));
        assert_eq!(b.spent(0, minute), 150);
        b.refund(0, 150);
        assert_eq!(b.spent(0, minute), 0);
        // A refund never takes a slot below zero, and one for a forgotten slot does nothing.
        b.charge(0, minute, 100, 10, false);
        b.refund(0, 50);
        b.refund(7, 50);
        assert_eq!(b.spent(0, minute), 0);
    }

    #[test]
    fn a_clock_that_steps_back_never_unspends() {
        let minute = Duration::from_secs(60);
        let mut b = BudgetWindow::new();
        b.charge(3600 * SECOND, minute, 100, 60, false);
        assert_eq!(b.charge(3000 * SECOND, minute, 100, 60, false).spent, 60);
    }

    #[test]
    fn gcra_is_a_token_bucket() {
        let mut g = Gcra::default();
        assert!((0..3).all(|_| g.acquire(0, 2.0, 3) == Acquired::Allowed));
        assert_eq!(g.acquire(0, 2.0, 3), Acquired::Limited { retry_after_micros: SECOND / 2 });
        assert_eq!(g.acquire(SECOND / 2, 2.0, 3), Acquired::Allowed);
        assert!(matches!(g.acquire(SECOND / 2, 2.0, 3), Acquired::Limited { .. }));
        assert!(g.is_idle_at(10 * SECOND));
        assert!((0..4).filter(|_| g.acquire(10 * SECOND, 2.0, 3) == Acquired::Allowed).count() == 3);
    }
}
