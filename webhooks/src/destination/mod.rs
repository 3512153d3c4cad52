//! Where verified events go: the [`Destination`] trait, its contract, and its implementations:
//! [`HttpDestination`] (POST, signed in Stripe's scheme), [`KafkaDestination`] (produce to Apache
//! Kafka) and [`SqsDestination`] (send to Amazon SQS). [`build`] makes the one a destination's
//! `kind` names. A new kind is a new file here, a `kind` word in the configuration and a run of
//! the conformance suite.
//!
//! # The contract every destination keeps
//!
//! - [`Destination::deliver`] hands one event to the destination and says what happened:
//!   - [`Outcome::Delivered`] only when the receiver acknowledged it: HTTP, a 2xx answer; Kafka,
//!     the broker's acknowledgement with `acks=all` (every in-sync replica has it); SQS, a
//!     successful `SendMessage`/`SendMessageBatch` entry (SQS stored it redundantly). Never on a
//!     guess: a lost answer is a failure, and the event is delivered again (at least once);
//!   - [`Outcome::Transient`] when another attempt may succeed: HTTP, any non-2xx answer, a
//!     refused connection, a TLS error, a timeout; brokers, an unreachable or paused broker, a
//!     timed-out acknowledgement, a missing topic or queue, refused credentials or permissions
//!     (an operator can fix them and the retries then succeed). keygate retries with back-off
//!     until the destination's `retry_for`, then dead-letters;
//!   - [`Outcome::Permanent`] when no retry of this event can succeed, whatever the receiver's
//!     state: the event is bigger than the broker takes (Kafka's `max_message_bytes`, SQS's
//!     message size limit), or the broker refuses the message itself as invalid. keygate
//!     dead-letters the delivery at once, with the reason; it can still be re-driven (after the
//!     limit was raised).
//! - It returns within [`Destination::timeout`] (plus scheduling slack), whatever the receiver
//!   does: a slow receiver costs its own destination's concurrency, never ingress or another
//!   destination.
//! - It may be called concurrently (up to the destination's concurrency limit) and with the same
//!   event more than once; every delivery carries keygate's event id
//!   ([`Delivery::event_id`], as the `keygate-event-id` header or message attribute) and the
//!   Stripe event id so that receivers can deduplicate.
//! - It delivers the body byte for byte as Stripe sent it.
//! - Its reasons are short and never hold a secret or body text.
//!
//! [`crate::conformance`] checks this contract; every implementation runs it.

mod http;
mod kafka;
mod sqs;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use keygate_secrets::SecretStore;
use serde::Deserialize;
use uuid::Uuid;

pub use self::http::HttpDestination;
pub use self::kafka::KafkaDestination;
pub use self::sqs::SqsDestination;
use crate::config::{DestinationConfig, DestinationKind};
use crate::error::WebhookError;
use crate::metrics::Metrics;

/// The header that carries keygate's event id with every delivery.
pub const EVENT_ID_HEADER: &str = "keygate-event-id";

/// The header that carries the attempt number (1 for the first).
pub const ATTEMPT_HEADER: &str = "keygate-delivery-attempt";

/// One delivery of one event.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// keygate's id of the received event (UUIDv7), the same on every attempt and replay.
    pub event_id: Uuid,
    /// Stripe's event id.
    pub stripe_event_id: String,
    /// The event type.
    pub event_type: String,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// The raw event JSON, as Stripe sent it.
    pub body: Bytes,
}

/// What one delivery attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Acknowledged by the receiver.
    Delivered { status: Option<u16> },
    /// Failed; a later attempt may succeed.
    Transient { status: Option<u16>, reason: String },
    /// Failed; no attempt can succeed.
    Permanent { status: Option<u16>, reason: String },
}

impl Outcome {
    /// The status the receiver answered, if it did.
    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Delivered { status } | Outcome::Transient { status, .. } | Outcome::Permanent { status, .. } => {
                *status
            }
        }
    }
}

/// A destination of webhook events. See the module documentation for the contract.
pub trait Destination: Send + Sync + std::fmt::Debug + 'static {
    /// The destination's configured name.
    fn name(&self) -> &str;
    /// The longest one delivery may take.
    fn timeout(&self) -> Duration;
    /// Delivers one event.
    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Outcome>;
    /// Why the destination cannot deliver now (a broker client's last error, until a delivery
    /// succeeds again), listed by `/readyz` as degraded: the instance stays ready, since the
    /// ingress keeps acknowledging. `None` when it can, or when it cannot tell before trying.
    fn readiness(&self) -> Option<String> {
        None
    }
}

/// Builds the destination a configuration's `kind` names (no I/O: broker clients connect on
/// their first delivery).
pub fn build(
    config: &DestinationConfig,
    secrets: SecretStore,
    metrics: Arc<Metrics>,
) -> Result<Arc<dyn Destination>, WebhookError> {
    Ok(match config.kind {
        DestinationKind::Http => Arc::new(HttpDestination::new(config, secrets)?),
        DestinationKind::Kafka => Arc::new(KafkaDestination::new(config, secrets, metrics)?),
        DestinationKind::Sqs => Arc::new(SqsDestination::new(config, metrics)?),
    })
}

/// What brokers carry beside the body: Kafka headers and SQS message attributes of the same
/// names, read from the (verified) body once per delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventAttributes {
    /// `(name, value)` pairs, in a fixed order; absent fields are left out.
    pub pairs: Vec<(&'static str, String)>,
    /// The Stripe object the event is about: `data.object.id` (snapshot events) or
    /// `related_object.id` (thin events); `None` when the event names none.
    pub object_id: Option<String>,
}

/// The Stripe event id (`stripe-event-id`).
pub const STRIPE_EVENT_ID: &str = "stripe-event-id";
/// The event type (`stripe-event-type`).
pub const STRIPE_EVENT_TYPE: &str = "stripe-event-type";
/// `true` or `false` (`stripe-livemode`).
pub const STRIPE_LIVEMODE: &str = "stripe-livemode";
/// The connected account (`stripe-account`), when the event has one.
pub const STRIPE_ACCOUNT: &str = "stripe-account";
/// The API version the event was rendered with (`stripe-api-version`), snapshot events only.
pub const STRIPE_API_VERSION: &str = "stripe-api-version";

#[derive(Deserialize)]
struct ObjectRef {
    id: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct DataRef {
    object: Option<ObjectRef>,
}

#[derive(Deserialize)]
struct Related {
    data: Option<DataRef>,
    related_object: Option<ObjectRef>,
}

fn id_text(object: Option<ObjectRef>) -> Option<String> {
    match object?.id? {
        serde_json::Value::String(id)
            if !id.is_empty() && id.len() <= 255 && id.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Some(id)
        }
        _ => None,
    }
}

impl EventAttributes {
    /// Reads the attributes of a delivery.
    pub fn of(delivery: &Delivery) -> EventAttributes {
        let meta = crate::event::parse(&delivery.body).ok();
        let mut pairs =
            vec![(STRIPE_EVENT_ID, delivery.stripe_event_id.clone()), (STRIPE_EVENT_TYPE, delivery.event_type.clone())];
        if let Some(meta) = &meta {
            if let Some(livemode) = meta.livemode {
                pairs.push((STRIPE_LIVEMODE, livemode.to_string()));
            }
            if let Some(account) = &meta.account {
                pairs.push((STRIPE_ACCOUNT, account.clone()));
            }
            if let Some(version) = &meta.api_version {
                pairs.push((STRIPE_API_VERSION, version.clone()));
            }
        }
        pairs.push((EVENT_ID_HEADER, delivery.event_id.to_string()));
        pairs.push((ATTEMPT_HEADER, delivery.attempt.to_string()));
        let object_id = serde_json::from_slice::<Related>(&delivery.body).ok().and_then(|related| {
            id_text(related.data.and_then(|d| d.object)).or_else(|| id_text(related.related_object))
        });
        EventAttributes { pairs, object_id }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(body: &str) -> Delivery {
        Delivery {
            event_id: Uuid::now_v7(),
            stripe_event_id: "evt_1".into(),
            event_type: "invoice.paid".into(),
            attempt: 3,
            body: Bytes::from(body.to_owned()),
        }
    }

    #[test]
    fn attributes_of_snapshot_and_thin_events() {
        let snapshot = delivery(
            r#"{"id":"evt_1","object":"event","type":"invoice.paid","livemode":true,"account":"acct_9","api_version":"2025-03-31.basil","data":{"object":{"id":"in_42","object":"invoice"}}}"#,
        );
        let attributes = EventAttributes::of(&snapshot);
        assert_eq!(attributes.object_id.as_deref(), Some("in_42"));
        let names: Vec<&str> = attributes.pairs.iter().map(|(n, _)| *n).collect();
        assert_eq!(
            names,
            [
                STRIPE_EVENT_ID,
                STRIPE_EVENT_TYPE,
                STRIPE_LIVEMODE,
                STRIPE_ACCOUNT,
                STRIPE_API_VERSION,
                EVENT_ID_HEADER,
                ATTEMPT_HEADER
            ]
        );
        assert!(attributes.pairs.contains(&(STRIPE_LIVEMODE, "true".into())));
        assert!(attributes.pairs.contains(&(ATTEMPT_HEADER, "3".into())));
        let thin = delivery(
            r#"{"id":"evt_1","object":"v2.core.event","type":"v1.billing.meter.error_report_triggered","livemode":false,"related_object":{"id":"mtr_1","type":"billing.meter"}}"#,
        );
        let attributes = EventAttributes::of(&thin);
        assert_eq!(attributes.object_id.as_deref(), Some("mtr_1"));
        assert!(!attributes.pairs.iter().any(|(n, _)| *n == STRIPE_ACCOUNT || *n == STRIPE_API_VERSION));
        assert_eq!(
            EventAttributes::of(&delivery(r#"{"id":"evt_1","type":"x","data":{"object":{"id":7}}}"#)).object_id,
            None
        );
    }
}
