//! One dispatcher task per destination: it holds the destination's pending deliveries in time
//! order (recovered from the state file at start, then handed over by the state writer after
//! each commit), runs at most `concurrency` attempts at once, and records each outcome: in the
//! state file first (delivered rows go, failures get their next attempt time, expired ones become
//! dead letters), then in the audit journal.
//!
//! Invariants: a destination's slowness only ever holds its own concurrency slots; an event is
//! never in flight twice to the same destination; a delivery's pending row goes only after a 2xx
//! (at least once: a crash in between delivers it again).

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rand::Rng;
use tokio::sync::{mpsc, watch};

use crate::config::DestinationConfig;
use crate::destination::{Delivery, Destination, Outcome};
use crate::journal::{EventJournal, WebhookKind, WebhookRecord};
use crate::metrics::Metrics;
use crate::store::{DeadLetter, PendingState, Store, StoredEvent, Work, id_time_ms, now_ms};

/// How a destination retries.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub retry_for: Duration,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    pub concurrency: usize,
}

impl RetryPolicy {
    pub fn from_config(config: &DestinationConfig) -> RetryPolicy {
        RetryPolicy {
            retry_for: config.retry_for,
            initial_backoff: config.initial_backoff,
            max_backoff: config.max_backoff,
            concurrency: config.concurrency,
        }
    }

    /// The delay after the `attempts`-th failure: `initial × 2^(attempts-1)`, at most
    /// `max_backoff`, with jitter (uniform in its upper half).
    pub fn backoff(&self, attempts: u32) -> Duration {
        let exponent = attempts.saturating_sub(1).min(30);
        let base = self.initial_backoff.saturating_mul(1u32 << exponent).min(self.max_backoff);
        let millis = u64::try_from(base.as_millis()).unwrap_or(u64::MAX).max(1);
        Duration::from_millis(rand::rng().random_range(millis.div_ceil(2)..=millis))
    }
}

/// What a finished attempt reports back to its dispatcher.
struct Finished {
    event: u128,
    state: PendingState,
    outcome: Option<Outcome>,
    stored: Option<StoredEvent>,
}

/// Everything a dispatcher needs.
pub(crate) struct DispatcherParts {
    pub destination: Arc<dyn Destination>,
    pub policy: RetryPolicy,
    pub store: Store,
    pub journal: Arc<dyn EventJournal>,
    pub metrics: Arc<Metrics>,
    pub work: mpsc::UnboundedReceiver<Work>,
    pub recovered: Vec<Work>,
    pub dead: usize,
    pub stop: watch::Receiver<bool>,
}

fn record(
    kind: WebhookKind,
    stored: &StoredEvent,
    destination: &str,
    attempt: u32,
    outcome: &Outcome,
) -> WebhookRecord {
    let reason = match outcome {
        Outcome::Delivered { .. } => None,
        Outcome::Transient { reason, .. } | Outcome::Permanent { reason, .. } => Some(reason.clone()),
    };
    WebhookRecord {
        event_id: crate::store::event_uuid(stored.id),
        received_at: SystemTime::now(),
        kind,
        endpoint: stored.endpoint.clone(),
        stripe_event_id: Some(stored.meta.id.clone()),
        event_type: Some(stored.meta.event_type.clone()),
        livemode: stored.meta.livemode,
        account: stored.meta.account.clone(),
        api_version: stored.meta.api_version.clone(),
        created: stored.meta.created,
        destination: Some(destination.to_owned()),
        attempt: Some(attempt),
        status: outcome.status(),
        reason,
        peer: None,
        body: None,
    }
}

/// Runs a destination's dispatcher until `stop`.
pub(crate) async fn run(parts: DispatcherParts) {
    let DispatcherParts { destination, policy, store, journal, metrics, mut work, recovered, dead, mut stop } = parts;
    let name = destination.name().to_owned();
    let labels = Metrics::destination(&name);
    metrics.dead_letters.get_or_create(&labels).set(i64::try_from(dead).unwrap_or(i64::MAX));
    // Queued (not in flight) deliveries and their state; the heap may hold stale entries, which
    // are skipped when their time no longer matches the state's.
    let mut queued: HashMap<u128, PendingState> = HashMap::new();
    let mut heap: BinaryHeap<Reverse<(u64, u128)>> = BinaryHeap::new();
    let mut in_flight: BTreeSet<u128> = BTreeSet::new();
    let mut open: BTreeSet<u128> = BTreeSet::new();
    let (done_tx, mut done_rx) = mpsc::unbounded_channel::<Finished>();
    let enqueue = |item: Work,
                   queued: &mut HashMap<u128, PendingState>,
                   heap: &mut BinaryHeap<Reverse<(u64, u128)>>,
                   open: &mut BTreeSet<u128>| {
        if open.insert(item.event) {
            heap.push(Reverse((item.state.next_attempt_ms, item.event)));
            queued.insert(item.event, item.state);
        }
    };
    for item in recovered {
        enqueue(item, &mut queued, &mut heap, &mut open);
    }
    loop {
        // Launch what is due, within the concurrency limit.
        let now = now_ms();
        while in_flight.len() < policy.concurrency {
            let Some(Reverse((at, event))) = heap.peek().copied() else { break };
            if at > now {
                break;
            }
            heap.pop();
            let Some(state) = queued.get(&event).filter(|s| s.next_attempt_ms == at).cloned() else { continue };
            queued.remove(&event);
            in_flight.insert(event);
            let destination = destination.clone();
            let store = store.clone();
            let done = done_tx.clone();
            tokio::spawn(async move {
                let finished = attempt(destination.as_ref(), &store, event, state).await;
                let _ = done.send(finished);
            });
        }
        metrics.backlog.get_or_create(&labels).set(i64::try_from(open.len()).unwrap_or(i64::MAX));
        let oldest = open.first().map(|id| crate::store::age(id_time_ms(*id)).as_secs_f64()).unwrap_or(0.0);
        metrics.backlog_age.get_or_create(&labels).set(oldest);

        let next_due = heap.peek().map(|Reverse((at, _))| *at);
        let can_launch = in_flight.len() < policy.concurrency;
        let sleep = async {
            match next_due {
                Some(at) if can_launch => tokio::time::sleep(Duration::from_millis(at.saturating_sub(now_ms()))).await,
                // Refresh the backlog age now and then even when idle.
                _ => tokio::time::sleep(Duration::from_secs(5)).await,
            }
        };
        tokio::select! {
            item = work.recv() => match item {
                Some(item) => enqueue(item, &mut queued, &mut heap, &mut open),
                None => return,
            },
            Some(finished) = done_rx.recv() => {
                in_flight.remove(&finished.event);
                let Some(outcome) = finished.outcome else {
                    // The event is gone from the state (it cannot be delivered any more).
                    open.remove(&finished.event);
                    store.delivered(finished.event, &name).await;
                    continue;
                };
                match settle(&policy, finished.state, &outcome) {
                    Settled::Delivered(state) => {
                        open.remove(&finished.event);
                        store.delivered(finished.event, &name).await;
                        let kind = if state.replay { WebhookKind::Replayed } else { WebhookKind::Delivered };
                        metrics.outcome(&name, kind.as_str());
                        if let Some(stored) = &finished.stored {
                            if !state.replay {
                                let latency = crate::store::age(stored.received_at_ms).as_secs_f64();
                                metrics.delivery_latency.get_or_create(&labels).observe(latency);
                            }
                            spawn_record(&journal, &metrics, record(kind, stored, &name, state.attempts, &outcome));
                        }
                    }
                    Settled::Retry(state) => {
                        metrics.retries.get_or_create(&labels).inc();
                        metrics.outcome(&name, "failed");
                        store.reschedule(finished.event, &name, state.clone()).await;
                        if let Some(stored) = &finished.stored {
                            let record = record(WebhookKind::DeliveryFailed, stored, &name, state.attempts, &outcome);
                            spawn_record(&journal, &metrics, record);
                        }
                        heap.push(Reverse((state.next_attempt_ms, finished.event)));
                        queued.insert(finished.event, state);
                    }
                    Settled::Dead(letter) => {
                        open.remove(&finished.event);
                        metrics.outcome(&name, "dead_lettered");
                        metrics.dead_letters.get_or_create(&labels).inc();
                        let attempts = letter.attempts;
                        store.dead_letter(finished.event, &name, letter).await;
                        tracing::warn!(destination = %name, event_id = %crate::store::event_uuid(finished.event), attempts, "webhook delivery dead-lettered");
                        if let Some(stored) = &finished.stored {
                            spawn_record(&journal, &metrics, record(WebhookKind::DeadLettered, stored, &name, attempts, &outcome));
                        }
                    }
                }
            }
            () = sleep => {}
            _ = stop.changed() => return,
        }
    }
}

/// Notes that dead letters were queued again (the store moved them back to pending).
pub(crate) fn redriven(metrics: &Metrics, destination: &str, count: usize) {
    metrics.dead_letters.get_or_create(&Metrics::destination(destination)).dec_by(i64::try_from(count).unwrap_or(0));
}

fn spawn_record(journal: &Arc<dyn EventJournal>, metrics: &Arc<Metrics>, record: WebhookRecord) {
    let journal = journal.clone();
    let metrics = metrics.clone();
    tokio::spawn(async move {
        if let Err(error) = journal.record(record).await {
            metrics.journal_failures.inc();
            tracing::warn!(error = %error, "a webhook delivery record could not be written to the audit log");
        }
    });
}

async fn attempt(destination: &dyn Destination, store: &Store, event: u128, state: PendingState) -> Finished {
    let lookup = {
        let store = store.clone();
        tokio::task::spawn_blocking(move || store.event(event)).await
    };
    let stored = match lookup {
        Ok(Ok(Some(stored))) => stored,
        Ok(Ok(None)) => return Finished { event, state, outcome: None, stored: None },
        Ok(Err(error)) => {
            tracing::warn!(error = %error, "a webhook event could not be read from the state file");
            let outcome = Outcome::Transient { status: None, reason: "the event could not be read locally".into() };
            return Finished { event, state, outcome: Some(outcome), stored: None };
        }
        Err(_) => {
            let outcome = Outcome::Transient { status: None, reason: "the event could not be read locally".into() };
            return Finished { event, state, outcome: Some(outcome), stored: None };
        }
    };
    let delivery = Delivery {
        event_id: crate::store::event_uuid(event),
        stripe_event_id: stored.meta.id.clone(),
        event_type: stored.meta.event_type.clone(),
        attempt: state.attempts.saturating_add(1),
        body: stored.body.clone(),
    };
    // The destination bounds itself; this guards against one that does not keep its contract.
    let guard = destination.timeout() + Duration::from_secs(1);
    let outcome = tokio::time::timeout(guard, destination.deliver(&delivery)).await.unwrap_or(Outcome::Transient {
        status: None,
        reason: "the destination did not answer within its timeout".into(),
    });
    Finished { event, state, outcome: Some(outcome), stored: Some(stored) }
}

enum Settled {
    Delivered(PendingState),
    Retry(PendingState),
    Dead(DeadLetter),
}

fn settle(policy: &RetryPolicy, mut state: PendingState, outcome: &Outcome) -> Settled {
    state.attempts = state.attempts.saturating_add(1);
    let now = now_ms();
    let (reason, permanent) = match outcome {
        Outcome::Delivered { .. } => return Settled::Delivered(state),
        Outcome::Transient { reason, .. } => (reason.clone(), false),
        Outcome::Permanent { reason, .. } => (reason.clone(), true),
    };
    let first_failure = *state.first_failure_ms.get_or_insert(now);
    let deadline = first_failure.saturating_add(u64::try_from(policy.retry_for.as_millis()).unwrap_or(u64::MAX));
    if permanent || now >= deadline {
        return Settled::Dead(DeadLetter {
            attempts: state.attempts,
            dead_at_ms: now,
            first_failure_ms: state.first_failure_ms,
            last_error: Some(reason),
            last_status: outcome.status(),
        });
    }
    let delay = u64::try_from(policy.backoff(state.attempts).as_millis()).unwrap_or(u64::MAX);
    // The last attempt falls on the deadline, so that the retry time is honoured exactly.
    state.next_attempt_ms = now.saturating_add(delay).min(deadline);
    state.last_error = Some(reason);
    Settled::Retry(state)
}

/// Unix seconds now.
pub(crate) fn unix_now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            retry_for: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(800),
            concurrency: 1,
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let policy = policy();
        for (attempts, full) in [(1u32, 100u64), (2, 200), (3, 400), (4, 800), (10, 800), (40, 800)] {
            for _ in 0..20 {
                let delay = u64::try_from(policy.backoff(attempts).as_millis()).unwrap_or(0);
                assert!((full / 2..=full).contains(&delay), "attempt {attempts}: {delay} ms");
            }
        }
    }

    #[test]
    fn failures_retry_until_the_retry_time_then_dead_letter() {
        let policy = policy();
        let fail = Outcome::Transient { status: Some(503), reason: "HTTP 503".into() };
        let fresh =
            PendingState { attempts: 0, next_attempt_ms: 0, first_failure_ms: None, replay: false, last_error: None };
        let Settled::Retry(state) = settle(&policy, fresh.clone(), &fail) else { panic!("retried") };
        assert_eq!(state.attempts, 1);
        assert!(state.first_failure_ms.is_some());
        let expired = PendingState { first_failure_ms: Some(now_ms() - 61_000), ..state.clone() };
        let Settled::Dead(letter) = settle(&policy, expired, &fail) else { panic!("dead-lettered") };
        assert_eq!((letter.attempts, letter.last_status), (2, Some(503)));
        let permanent = Outcome::Permanent { status: None, reason: "too large".into() };
        assert!(matches!(settle(&policy, fresh.clone(), &permanent), Settled::Dead(_)));
        assert!(matches!(settle(&policy, fresh, &Outcome::Delivered { status: Some(200) }), Settled::Delivered(_)));
    }
}
