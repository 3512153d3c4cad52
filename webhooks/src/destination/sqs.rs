//! The SQS destination: sends each event to an Amazon SQS queue, standard or FIFO.
//!
//! - Delivered = SQS answered the event's `SendMessageBatch` entry (or its one-by-one
//!   `SendMessage` retry) as successful: the queue has stored it.
//! - Body = the raw event JSON; message attributes (all `String`) = [`EventAttributes`]: the
//!   Stripe event id, type, livemode, account and API version, keygate's event id and attempt.
//! - FIFO queues (`….fifo`): `MessageDeduplicationId` = the Stripe event id (a re-drive or retry
//!   within SQS's 5-minute window is stored once), `MessageGroupId` = the Stripe object id
//!   (`data.object.id`, or `related_object.id` of thin events; the Stripe event id when the event
//!   names no object), so each object's events are consumed in order.
//! - Batching: concurrent deliveries are gathered by a few sender tasks into `SendMessageBatch`
//!   calls of up to 10 entries (and within the size limit): whatever is waiting when a sender is
//!   free goes in the next call, so nothing waits for a batch to fill. Entries a batch reports as
//!   failed are retried one by one with `SendMessage` at once, and that answer decides.
//! - A message over `max_message_bytes` (SQS counts the body and every attribute's name, type and
//!   value) is a permanent failure with the sizes in the reason: it is dead-lettered at once.
//! - Client: keygate-secrets' AWS setup ([`keygate_secrets::aws_sdk_config`]): the default
//!   credential chain, rustls on `ring`, optional region / endpoint override / profile / file.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_sqs::types::{MessageAttributeValue, SendMessageBatchRequestEntry};
use futures::future::BoxFuture;
use tokio::sync::{OnceCell, mpsc, oneshot};

use super::{Delivery, Destination, EventAttributes, Outcome};
use crate::config::{DestinationConfig, SqsConfig};
use crate::error::WebhookError;
use crate::metrics::Metrics;

/// Entries per `SendMessageBatch` call (SQS's maximum).
const MAX_BATCH: usize = 10;

/// Sends each event to an SQS queue.
pub struct SqsDestination {
    name: String,
    timeout: Duration,
    queue: Arc<Queue>,
    tx: mpsc::Sender<Pending>,
}

impl std::fmt::Debug for SqsDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqsDestination").field("name", &self.name).finish_non_exhaustive()
    }
}

/// What the sender tasks share.
struct Queue {
    name: String,
    config: SqsConfig,
    timeout: Duration,
    client: OnceCell<Client>,
    metrics: Arc<Metrics>,
    last_error: Mutex<Option<String>>,
}

/// One message waiting for a sender task.
struct Pending {
    message: Message,
    reply: oneshot::Sender<Outcome>,
}

#[derive(Clone)]
struct Message {
    body: String,
    attributes: HashMap<String, MessageAttributeValue>,
    group_id: Option<String>,
    dedup_id: Option<String>,
    size: usize,
}

impl SqsDestination {
    /// Builds the destination and starts its sender tasks (the AWS client is made on the first
    /// delivery). Must run inside a Tokio runtime.
    pub fn new(config: &DestinationConfig, metrics: Arc<Metrics>) -> Result<SqsDestination, WebhookError> {
        let fail = |reason: &str| WebhookError::Destination { name: config.name.clone(), reason: reason.to_owned() };
        let sqs = config.sqs.clone().ok_or_else(|| fail("the `sqs` section is missing"))?;
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| fail("needs a Tokio runtime"))?;
        let queue = Arc::new(Queue {
            name: config.name.clone(),
            config: sqs,
            timeout: config.timeout,
            client: OnceCell::new(),
            metrics,
            last_error: Mutex::new(None),
        });
        let (tx, rx) = mpsc::channel(config.concurrency.max(1));
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..config.concurrency.div_ceil(MAX_BATCH).max(1) {
            runtime.spawn(sender(queue.clone(), rx.clone()));
        }
        Ok(SqsDestination { name: config.name.clone(), timeout: config.timeout, queue, tx })
    }

    fn message(&self, delivery: &Delivery) -> Result<Message, Outcome> {
        let permanent = |reason: String| Outcome::Permanent { status: None, reason };
        let body = std::str::from_utf8(&delivery.body)
            .map_err(|_| permanent("the event body is not UTF-8 text, which SQS requires".into()))?;
        if let Some(c) = body.chars().find(|c| !allowed(*c)) {
            return Err(permanent(format!("the event body holds U+{:04X}, a character SQS refuses", u32::from(c))));
        }
        let attributes = EventAttributes::of(delivery);
        let mut size = body.len();
        let mut map = HashMap::new();
        for (name, value) in &attributes.pairs {
            size += name.len() + "String".len() + value.len();
            if let Ok(value) = MessageAttributeValue::builder().data_type("String").string_value(value.clone()).build()
            {
                map.insert((*name).to_owned(), value);
            }
        }
        let limit = self.queue.config.max_message_bytes;
        if size > limit {
            return Err(permanent(format!(
                "the message is {size} bytes (body and attributes), over the queue's limit of {limit} bytes"
            )));
        }
        let (group_id, dedup_id) = if self.queue.config.is_fifo() {
            let group = attributes.object_id.clone().unwrap_or_else(|| delivery.stripe_event_id.clone());
            (Some(fifo_id(&group)), Some(fifo_id(&delivery.stripe_event_id)))
        } else {
            (None, None)
        };
        Ok(Message { body: body.to_owned(), attributes: map, group_id, dedup_id, size })
    }
}

/// Whether SQS accepts the character in a message (its documented set).
fn allowed(c: char) -> bool {
    matches!(c, '\u{9}' | '\u{a}' | '\u{d}' | '\u{20}'..='\u{d7ff}' | '\u{e000}'..='\u{fffd}' | '\u{10000}'..='\u{10ffff}')
}

/// A FIFO group or deduplication id: at most 128 of SQS's allowed characters. Stripe's ids fit;
/// a longer one is replaced by its SHA-256 (hex), which keeps it stable across attempts.
fn fifo_id(id: &str) -> String {
    if id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic()) {
        id.to_owned()
    } else {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, id.as_bytes()))
    }
}

impl Queue {
    async fn client(&self) -> &Client {
        self.client
            .get_or_init(|| async {
                let sdk = keygate_secrets::aws_sdk_config(&self.config.aws, self.timeout).await;
                Client::new(&sdk)
            })
            .await
    }

    fn note(&self, outcome: &Outcome) {
        let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
        match outcome {
            Outcome::Delivered { .. } => *last = None,
            Outcome::Transient { reason, .. } => {
                self.metrics.destination_error(&self.name, "sqs");
                *last = Some(reason.clone());
            }
            Outcome::Permanent { .. } => self.metrics.destination_error(&self.name, "sqs_message_refused"),
        }
    }

    async fn send_batch(&self, batch: Vec<Pending>) {
        let client = self.client().await;
        let mut entries = Vec::with_capacity(batch.len());
        for (i, pending) in batch.iter().enumerate() {
            let message = &pending.message;
            let entry = SendMessageBatchRequestEntry::builder()
                .id(i.to_string())
                .message_body(message.body.clone())
                .set_message_attributes(Some(message.attributes.clone()))
                .set_message_group_id(message.group_id.clone())
                .set_message_deduplication_id(message.dedup_id.clone())
                .build();
            match entry {
                Ok(entry) => entries.push(entry),
                Err(_) => {
                    return self.reply_all(batch, transient("the SQS request could not be built"));
                }
            }
        }
        let answer =
            client.send_message_batch().queue_url(&self.config.queue_url).set_entries(Some(entries)).send().await;
        let output = match answer {
            Ok(output) => output,
            Err(error) => return self.reply_all(batch, classify(&error, self.timeout)),
        };
        // Delivered only when SQS names the entry as stored; anything else is sent again alone.
        let stored: HashSet<usize> = output.successful().iter().filter_map(|f| f.id().parse().ok()).collect();
        let mut retries = Vec::new();
        for (i, pending) in batch.into_iter().enumerate() {
            if !stored.contains(&i) {
                retries.push(pending);
            } else {
                let outcome = Outcome::Delivered { status: None };
                self.note(&outcome);
                let _ = pending.reply.send(outcome);
            }
        }
        // Partial failures: one by one, and that answer decides.
        for pending in retries {
            let message = &pending.message;
            let answer = client
                .send_message()
                .queue_url(&self.config.queue_url)
                .message_body(message.body.clone())
                .set_message_attributes(Some(message.attributes.clone()))
                .set_message_group_id(message.group_id.clone())
                .set_message_deduplication_id(message.dedup_id.clone())
                .send()
                .await;
            let outcome = match answer {
                Ok(_) => Outcome::Delivered { status: None },
                Err(error) => classify(&error, self.timeout),
            };
            self.note(&outcome);
            let _ = pending.reply.send(outcome);
        }
    }

    fn reply_all(&self, batch: Vec<Pending>, outcome: Outcome) {
        self.note(&outcome);
        for pending in batch {
            let _ = pending.reply.send(outcome.clone());
        }
    }
}

fn transient(reason: &str) -> Outcome {
    Outcome::Transient { status: None, reason: reason.to_owned() }
}

/// An SDK error as an outcome: the message's own content refused is permanent, the rest
/// (unreachable, timed out, throttled, no such queue, access denied) transient. Reasons carry the
/// AWS error code only, never a message text that could echo input.
fn classify<E: ProvideErrorMetadata, R>(error: &SdkError<E, R>, timeout: Duration) -> Outcome {
    match error {
        SdkError::TimeoutError(_) => Outcome::Transient {
            status: None,
            reason: format!("SQS did not answer within {}", humantime::format_duration(timeout)),
        },
        SdkError::DispatchFailure(failure) if failure.is_timeout() => Outcome::Transient {
            status: None,
            reason: format!("SQS did not answer within {}", humantime::format_duration(timeout)),
        },
        SdkError::DispatchFailure(_) => transient("SQS could not be reached"),
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("unknown");
            let code: String = code.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '.').take(80).collect();
            if matches!(
                code.as_str(),
                "InvalidMessageContents" | "MessageTooLong" | "AWS.SimpleQueueService.InvalidMessageContents"
            ) {
                Outcome::Permanent { status: None, reason: format!("SQS refused the message: {code}") }
            } else {
                Outcome::Transient { status: None, reason: format!("SQS answered {code}") }
            }
        }
        SdkError::ResponseError(_) => transient("SQS's answer could not be read"),
        _ => transient("the SQS request failed"),
    }
}

/// A sender task: takes what is waiting (up to 10 entries within the size limit) and sends it.
async fn sender(queue: Arc<Queue>, rx: Arc<tokio::sync::Mutex<mpsc::Receiver<Pending>>>) {
    loop {
        let batch = {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else { return };
            let mut size = first.message.size;
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(next) if size + next.message.size <= queue.config.max_message_bytes => {
                        size += next.message.size;
                        batch.push(next);
                    }
                    Ok(next) => {
                        // Too big to join this batch: it goes in a call of its own, now.
                        drop(rx);
                        let queue = queue.clone();
                        tokio::spawn(async move { queue.send_batch(vec![next]).await });
                        break;
                    }
                    Err(_) => break,
                }
            }
            batch
        };
        queue.send_batch(batch).await;
    }
}

impl Destination for SqsDestination {
    fn name(&self) -> &str {
        &self.name
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            let message = match self.message(delivery) {
                Ok(message) => message,
                Err(outcome) => {
                    self.queue.note(&outcome);
                    return outcome;
                }
            };
            let (reply, answer) = oneshot::channel();
            let waited = tokio::time::timeout(self.timeout, async {
                if self.tx.send(Pending { message, reply }).await.is_err() {
                    return transient("the SQS sender stopped");
                }
                answer.await.unwrap_or_else(|_| transient("the SQS sender stopped"))
            })
            .await;
            waited.unwrap_or_else(|_| Outcome::Transient {
                status: None,
                reason: format!("SQS did not answer within {}", humantime::format_duration(self.timeout)),
            })
        })
    }

    fn readiness(&self) -> Option<String> {
        let last = self.queue.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        last.map(|reason| format!("webhook destination `{}` (sqs): the last send failed: {reason}", self.name))
    }
}
