//! The one conformance suite of [`Destination`]: every implementation (HTTP, Kafka, SQS) runs
//! [`run`] against a [`Harness`] that gives it destinations in several situations, can take the
//! accepting receiver down and back, and tells what the receiver got. It checks the contract
//! written in [`crate::destination`]:
//!
//! 1. delivered: an acknowledged delivery is `Delivered` and the receiver has the exact body with
//!    keygate's event id (once; a fresh client's first delivery may time out while it connects,
//!    and is then tried again, up to 3 times, each attempt arriving at most once); concurrent
//!    deliveries all arrive;
//! 2. transient failure then success: while the receiver is down a delivery is `Transient` within
//!    the timeout and not received; once it is back, the retry (attempt 2) is `Delivered`;
//! 3. permanent failure: a body the destination can never take (bigger than the broker's limit)
//!    is `Permanent` with a reason naming the size, so the dispatcher dead-letters it at once (the
//!    dispatcher's own tests check that `Permanent` dead-letters and `Transient` retries);
//! 4. re-drive: an event delivered before and sent again (a re-drive or replay, or a retry after a
//!    lost acknowledgement) is delivered again: the receiver has it at least twice, or exactly
//!    once when the destination deduplicates (SQS FIFO on the Stripe event id);
//! 5. refusing, unreachable and hanging receivers: never `Delivered`, each answer within the
//!    destination's timeout, with a short reason that names no secret.
//!
//! Test support: it asserts (panics) on a broken contract.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use uuid::Uuid;

use crate::destination::{Delivery, Destination, Outcome};

/// One delivery as the receiver saw it (after checking whatever the destination signs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// keygate's event id, as carried by the delivery.
    pub event_id: Uuid,
    /// The body, as received.
    pub body: Bytes,
}

/// What an implementation provides to be checked. Every destination it returns must have a
/// timeout of at most 1 s so the suite stays quick.
pub trait Harness: Send + Sync {
    /// A destination whose receiver acknowledges every (correctly signed) delivery.
    fn accepting(&self) -> Arc<dyn Destination>;
    /// A destination whose receiver answers every delivery with a failure.
    fn refusing(&self) -> Arc<dyn Destination>;
    /// A destination whose receiver cannot be reached at all.
    fn unreachable(&self) -> Arc<dyn Destination>;
    /// A destination whose receiver accepts the connection but never answers.
    fn hanging(&self) -> Arc<dyn Destination>;
    /// Every delivery the accepting receiver acknowledged so far.
    fn received(&self) -> BoxFuture<'_, Vec<Received>>;
    /// Takes the accepting receiver down (HTTP: it answers 503; a broker: its process is
    /// paused) until [`Harness::restore`].
    fn outage(&self) -> BoxFuture<'_, ()>;
    /// Brings the accepting receiver back.
    fn restore(&self) -> BoxFuture<'_, ()>;
    /// The size of a body the accepting destination can never take, if it has such a limit.
    fn oversized_body(&self) -> Option<usize>;
    /// Whether the destination deduplicates a repeated Stripe event id (SQS FIFO).
    fn deduplicates(&self) -> bool {
        false
    }
}

/// A delivery of an `invoice.paid` event of invoice `in_conformance_<n>`, with a non-ASCII body.
pub fn delivery(n: u32) -> Delivery {
    sized_delivery(n, 0)
}

fn sized_delivery(n: u32, padding: usize) -> Delivery {
    let stripe_event_id = format!("evt_conformance_{n}_{}", Uuid::new_v4().simple());
    let pad = "x".repeat(padding);
    let body = format!(
        "{{\"id\":\"{stripe_event_id}\",\"object\":\"event\",\"type\":\"invoice.paid\",\"livemode\":false,\"api_version\":\"2025-03-31.basil\",\"data\":{{\"object\":{{\"id\":\"in_conformance_{n}\",\"object\":\"invoice\",\"note\":\"caf\u{e9} \\u00e9 {n}\",\"pad\":\"{pad}\"}}}}}}"
    );
    Delivery {
        event_id: Uuid::now_v7(),
        stripe_event_id,
        event_type: "invoice.paid".into(),
        attempt: 1,
        body: Bytes::from(body),
    }
}

fn copies(received: &[Received], delivery: &Delivery) -> usize {
    received.iter().filter(|r| r.event_id == delivery.event_id && r.body == delivery.body).count()
}

async fn eventually_received(harness: &dyn Harness, deliveries: &[&Delivery]) -> Vec<Received> {
    // Brokers make an acknowledged message readable a little later; give them a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let received = harness.received().await;
        if deliveries.iter().all(|d| copies(&received, d) > 0) || Instant::now() > deadline {
            return received;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn check_failure(what: &str, destination: &dyn Destination, outcome: &Outcome, took: Duration) {
    assert!(!matches!(outcome, Outcome::Delivered { .. }), "{what}: reported as delivered");
    assert!(
        took <= destination.timeout() + Duration::from_millis(500),
        "{what}: took {took:?}, timeout {:?}",
        destination.timeout()
    );
    match outcome {
        Outcome::Transient { reason, .. } | Outcome::Permanent { reason, .. } => {
            assert!(!reason.is_empty() && reason.len() < 200, "{what}: reason {reason:?}");
            assert!(!reason.contains("whsec_"), "{what}: a reason names a secret");
        }
        Outcome::Delivered { .. } => {}
    }
}

/// Runs the whole suite.
pub async fn run(harness: &dyn Harness) {
    // 1. Delivered: acknowledged, the exact body with keygate's event id.
    let accepting = harness.accepting();
    assert!(accepting.timeout() <= Duration::from_secs(1), "harness destinations must time out within 1 s");
    let first = delivery(1);
    // A client's very first delivery also opens its connection (for Kafka: metadata and the
    // idempotent producer's id as well), which on a loaded machine can take longer than the
    // timeout: that is a transient failure, and the dispatcher would retry it. So may the suite,
    // a few times; each timed-out attempt may still arrive later (at least once).
    let mut attempts = 0;
    let outcome = loop {
        attempts += 1;
        let outcome = accepting.deliver(&first).await;
        if attempts == 3 || !matches!(outcome, Outcome::Transient { .. }) {
            break outcome;
        }
    };
    assert!(matches!(outcome, Outcome::Delivered { .. }), "acknowledged delivery reported as {outcome:?}");
    let received = eventually_received(harness, &[&first]).await;
    let arrived = copies(&received, &first);
    assert!(
        arrived == 1 || (attempts > 1 && (1..=attempts).contains(&arrived)),
        "the receiver did not get the exact body once with the event id ({attempts} attempt(s)): {received:?}"
    );

    // Concurrent deliveries all arrive.
    let batch: Vec<Delivery> = (10..26).map(delivery).collect();
    let outcomes = futures::future::join_all(batch.iter().map(|d| accepting.deliver(d))).await;
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Delivered { .. })), "{outcomes:?}");
    let received = eventually_received(harness, &batch.iter().collect::<Vec<_>>()).await;
    for sent in &batch {
        assert!(copies(&received, sent) > 0, "lost {}", sent.event_id);
    }

    // 2. Transient failure then success.
    harness.outage().await;
    let during = delivery(30);
    let started = Instant::now();
    let outcome = accepting.deliver(&during).await;
    check_failure("receiver down", accepting.as_ref(), &outcome, started.elapsed());
    assert!(
        matches!(outcome, Outcome::Transient { .. }),
        "a receiver that is down is a transient failure: {outcome:?}"
    );
    harness.restore().await;
    let retry = Delivery { attempt: 2, ..during.clone() };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let outcome = accepting.deliver(&retry).await;
        if matches!(outcome, Outcome::Delivered { .. }) {
            break;
        }
        // A client may need a moment to notice that its connection is usable again.
        assert!(Instant::now() < deadline, "the receiver is back but the retry still fails: {outcome:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let received = eventually_received(harness, &[&retry]).await;
    assert!(copies(&received, &retry) >= 1, "the retry after the outage did not arrive");

    // 3. Permanent failure: a body the destination can never take.
    if let Some(size) = harness.oversized_body() {
        let huge = sized_delivery(40, size);
        let started = Instant::now();
        let outcome = accepting.deliver(&huge).await;
        check_failure("oversized body", accepting.as_ref(), &outcome, started.elapsed());
        match &outcome {
            Outcome::Permanent { reason, .. } => {
                assert!(reason.contains("bytes"), "the reason should name the size: {reason:?}")
            }
            other => panic!("a body over the destination's limit must be a permanent failure: {other:?}"),
        }
        assert_eq!(copies(&harness.received().await, &huge), 0, "the oversized body arrived");
    }

    // 4. Re-drive: the first event sent again.
    let redriven = Delivery { attempt: 1, ..first.clone() };
    assert!(matches!(accepting.deliver(&redriven).await, Outcome::Delivered { .. }));
    let expected = if harness.deduplicates() { 1 } else { 2 };
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut seen = 0;
    while Instant::now() < deadline {
        seen = copies(&harness.received().await, &first);
        if seen >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if harness.deduplicates() {
        // Give a duplicate the time to show up if the destination let it through.
        tokio::time::sleep(Duration::from_millis(500)).await;
        seen = copies(&harness.received().await, &first);
        assert_eq!(seen, 1, "a deduplicating destination delivered a re-driven event {seen} times");
    } else {
        assert!(seen >= 2, "a re-driven event must reach the receiver again (at least once), got {seen}");
    }

    // 5. Refusing, unreachable, hanging.
    for (what, destination) in
        [("refusing", harness.refusing()), ("unreachable", harness.unreachable()), ("hanging", harness.hanging())]
    {
        let attempt = delivery(100);
        let started = Instant::now();
        let outcome = destination.deliver(&attempt).await;
        check_failure(what, destination.as_ref(), &outcome, started.elapsed());
        let received = harness.received().await;
        assert!(!received.iter().any(|r| r.event_id == attempt.event_id), "{what}: the receiver recorded it");
    }
}
