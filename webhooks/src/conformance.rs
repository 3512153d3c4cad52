//! The one conformance suite of [`Destination`]: every implementation (HTTP here; Kafka and SQS
//! later) runs [`run`] against a [`Harness`] that gives it destinations in four situations and
//! tells what the receiver got. It checks the contract written in [`crate::destination`].
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
}

fn delivery(n: u32) -> Delivery {
    let stripe_event_id = format!("evt_conformance_{n}_{}", Uuid::new_v4().simple());
    let body = format!(
        "{{\"id\":\"{stripe_event_id}\",\"object\":\"event\",\"type\":\"invoice.paid\",\"data\":{{\"object\":{{\"note\":\"caf\u{e9} \\u00e9 {n}\"}}}}}}"
    );
    Delivery {
        event_id: Uuid::now_v7(),
        stripe_event_id,
        event_type: "invoice.paid".into(),
        attempt: 1,
        body: Bytes::from(body),
    }
}

/// Runs the whole suite.
pub async fn run(harness: &dyn Harness) {
    // 1. An acknowledged delivery is Delivered, and the receiver got the body byte for byte
    //    with keygate's event id.
    let accepting = harness.accepting();
    assert!(accepting.timeout() <= Duration::from_secs(1), "harness destinations must time out within 1 s");
    let first = delivery(1);
    let outcome = accepting.deliver(&first).await;
    assert!(matches!(outcome, Outcome::Delivered { .. }), "acknowledged delivery reported as {outcome:?}");
    let received = harness.received().await;
    assert!(
        received.contains(&Received { event_id: first.event_id, body: first.body.clone() }),
        "the receiver did not get the exact body with the event id: {received:?}"
    );

    // 2. The same delivery again (a retry after a lost answer) is delivered again.
    let again = Delivery { attempt: 2, ..first.clone() };
    assert!(matches!(accepting.deliver(&again).await, Outcome::Delivered { .. }));
    let copies = harness.received().await.iter().filter(|r| r.event_id == first.event_id).count();
    assert!(copies >= 2, "a repeated delivery must reach the receiver again (at least once), got {copies}");

    // 3. Concurrent deliveries all arrive.
    let batch: Vec<Delivery> = (10..26).map(delivery).collect();
    let outcomes = futures::future::join_all(batch.iter().map(|d| accepting.deliver(d))).await;
    assert!(outcomes.iter().all(|o| matches!(o, Outcome::Delivered { .. })), "{outcomes:?}");
    let received = harness.received().await;
    for sent in &batch {
        assert!(received.iter().any(|r| r.event_id == sent.event_id && r.body == sent.body), "lost {}", sent.event_id);
    }

    // 4. A receiver that refuses, one that cannot be reached, and one that never answers: never
    //    Delivered, and each answer comes within the destination's timeout.
    for (what, destination) in
        [("refusing", harness.refusing()), ("unreachable", harness.unreachable()), ("hanging", harness.hanging())]
    {
        let attempt = delivery(100);
        let started = Instant::now();
        let outcome = destination.deliver(&attempt).await;
        let took = started.elapsed();
        assert!(!matches!(outcome, Outcome::Delivered { .. }), "{what} receiver reported as delivered");
        assert!(
            took <= destination.timeout() + Duration::from_millis(500),
            "{what}: took {took:?}, timeout {:?}",
            destination.timeout()
        );
        match &outcome {
            Outcome::Transient { reason, .. } | Outcome::Permanent { reason, .. } => {
                assert!(!reason.is_empty() && reason.len() < 200, "{what}: reason {reason:?}");
                assert!(!reason.contains("whsec_"), "{what}: a reason names a secret");
            }
            Outcome::Delivered { .. } => {}
        }
        let received = harness.received().await;
        assert!(!received.iter().any(|r| r.event_id == attempt.event_id), "{what}: the receiver recorded it");
    }
}
