//! The Kafka destination: produces each event to Apache Kafka through librdkafka (`rdkafka`).
//!
//! - The producer is idempotent (`enable.idempotence=true`, which implies `acks=all` and
//!   ordered, de-duplicated retries within one producer session). Delivered = the broker's
//!   acknowledgement of the message, with every in-sync replica holding it.
//! - Topic: the first `routes` entry whose event filters match the type, else `topic`.
//! - Key: the Stripe object id (`data.object.id`, or `related_object.id` of thin events; the
//!   Stripe event id when the event names no object), so that each object's events land in one
//!   partition, in the order keygate sends them.
//! - Headers: [`EventAttributes`] (Stripe event id, type, livemode, account, API version,
//!   keygate's event id and attempt). Value: the raw event JSON as Stripe sent it.
//! - Security: `security_protocol` plaintext / ssl / sasl_plaintext / sasl_ssl; SASL PLAIN or
//!   SCRAM-SHA-256/512 with the password from a secret reference, fetched when the producer is
//!   made (at the first delivery; a rotated password takes effect at the next start); TLS trusts
//!   `ca_file` when given, else the system's CA store.
//! - An event over `max_message_bytes` is a permanent failure (dead-lettered at once); so is a
//!   broker's refusal of the message as too large or invalid. Everything else (brokers down or
//!   paused, no acknowledgement within the timeout, unknown topic, authentication) is transient.
//! - Producer errors (librdkafka's error callback and failed deliveries) are counted in
//!   `keygate_webhook_destination_errors{error="kafka_…"}`; the last one is the destination's
//!   `/readyz` reason until a delivery succeeds again.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use keygate_secrets::SecretStore;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;

use super::{Delivery, Destination, EventAttributes, Outcome};
use crate::config::{DestinationConfig, KafkaConfig, KafkaSecurityProtocol};
use crate::error::WebhookError;
use crate::metrics::Metrics;

/// Produces each event to a Kafka topic.
pub struct KafkaDestination {
    name: String,
    timeout: Duration,
    config: KafkaConfig,
    ca_file: Option<std::path::PathBuf>,
    secrets: SecretStore,
    /// Made at the first delivery; made again after a fatal producer error.
    producer: std::sync::RwLock<Option<Arc<FutureProducer<Context>>>>,
    making: tokio::sync::Mutex<()>,
    health: Arc<Health>,
}

impl std::fmt::Debug for KafkaDestination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaDestination").field("name", &self.name).finish_non_exhaustive()
    }
}

/// The producer's last error and the metrics it counts into.
struct Health {
    name: String,
    metrics: Arc<Metrics>,
    last_error: Mutex<Option<String>>,
}

impl Health {
    fn failed(&self, word: &str, reason: String) {
        self.metrics.destination_error(&self.name, word);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
    }
    fn succeeded(&self) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// librdkafka's callbacks: errors go to [`Health`], logs to `tracing`.
struct Context {
    health: Arc<Health>,
}

/// A fixed word for an error code (metric label).
fn word(code: Option<RDKafkaErrorCode>) -> String {
    match code {
        Some(code) => {
            let text = format!("{code:?}");
            let mut word = String::from("kafka");
            for c in text.chars() {
                if c.is_ascii_uppercase() {
                    word.push('_');
                }
                word.push(c.to_ascii_lowercase());
            }
            word
        }
        None => "kafka_client".into(),
    }
}

impl ClientContext for Context {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, facility: &str, message: &str) {
        use rdkafka::config::RDKafkaLogLevel as L;
        match level {
            L::Emerg | L::Alert | L::Critical | L::Error => {
                tracing::warn!(destination = %self.health.name, facility, "librdkafka: {message}")
            }
            L::Warning | L::Notice => {
                tracing::info!(destination = %self.health.name, facility, "librdkafka: {message}")
            }
            L::Info | L::Debug => tracing::debug!(destination = %self.health.name, facility, "librdkafka: {message}"),
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let code = error.rdkafka_error_code();
        tracing::warn!(destination = %self.health.name, error = %error, "kafka producer error: {reason}");
        self.health.failed(&word(code), format!("producer error: {error}"));
    }
}

impl KafkaDestination {
    /// Builds the destination (no I/O: the producer is made at the first delivery).
    pub fn new(
        config: &DestinationConfig,
        secrets: SecretStore,
        metrics: Arc<Metrics>,
    ) -> Result<KafkaDestination, WebhookError> {
        let kafka = config.kafka.clone().ok_or_else(|| WebhookError::Destination {
            name: config.name.clone(),
            reason: "the `kafka` section is missing".into(),
        })?;
        Ok(KafkaDestination {
            name: config.name.clone(),
            timeout: config.timeout,
            config: kafka,
            ca_file: config.ca_file.clone(),
            secrets,
            producer: std::sync::RwLock::new(None),
            making: tokio::sync::Mutex::new(()),
            health: Arc::new(Health { name: config.name.clone(), metrics, last_error: Mutex::new(None) }),
        })
    }

    fn current(&self) -> Option<Arc<FutureProducer<Context>>> {
        self.producer.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    async fn producer(&self) -> Result<Arc<FutureProducer<Context>>, Outcome> {
        if let Some(producer) = self.current() {
            return Ok(producer);
        }
        let _making = self.making.lock().await;
        if let Some(producer) = self.current() {
            return Ok(producer);
        }
        let producer = Arc::new(self.make().await?);
        *self.producer.write().unwrap_or_else(|e| e.into_inner()) = Some(producer.clone());
        Ok(producer)
    }

    /// Drops a producer that hit a fatal error (the next delivery makes a new one).
    fn discard_if_fatal(&self, producer: &Arc<FutureProducer<Context>>) {
        use rdkafka::producer::Producer as _;
        if let Some((code, reason)) = producer.client().fatal_error() {
            tracing::warn!(destination = %self.name, ?code, "fatal Kafka producer error; a new producer is made: {reason}");
            let mut slot = self.producer.write().unwrap_or_else(|e| e.into_inner());
            if slot.as_ref().is_some_and(|p| Arc::ptr_eq(p, producer)) {
                *slot = None;
            }
        }
    }

    async fn make(&self) -> Result<FutureProducer<Context>, Outcome> {
        let mut client = ClientConfig::new();
        let timeout_ms = self.timeout.as_millis().max(1);
        client
            .set("bootstrap.servers", self.config.brokers.join(","))
            .set("client.id", format!("keygate-webhooks-{}", self.name))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", self.config.linger.as_millis().to_string())
            .set("message.max.bytes", self.config.max_message_bytes.max(1000).to_string())
            // librdkafka gives up on a message within the destination's timeout and says so.
            .set("message.timeout.ms", timeout_ms.to_string())
            .set("socket.connection.setup.timeout.ms", timeout_ms.max(1000).to_string())
            // Notice a returning broker quickly (the default backs off up to 10 s).
            .set("reconnect.backoff.max.ms", "1000")
            .set("security.protocol", self.config.security_protocol.as_str());
        if matches!(self.config.security_protocol, KafkaSecurityProtocol::Ssl | KafkaSecurityProtocol::SaslSsl)
            && let Some(ca) = &self.ca_file
        {
            client.set("ssl.ca.location", ca.display().to_string());
        }
        if let Some(sasl) = &self.config.sasl {
            let password = self.secrets.get(&sasl.password).await.map_err(|_| Outcome::Transient {
                status: None,
                reason: format!("the SASL password {} could not be fetched", sasl.password),
            })?;
            client
                .set("sasl.mechanism", sasl.mechanism.as_str())
                .set("sasl.username", &sasl.username)
                .set("sasl.password", password.value.expose());
        }
        client.create_with_context(Context { health: self.health.clone() }).map_err(|error| {
            // The error names a setting, never the password's value.
            let reason = format!("the Kafka producer could not be made: {}", first_line(&error.to_string()));
            self.health.failed("kafka_config", reason.clone());
            Outcome::Transient { status: None, reason }
        })
    }

    async fn attempt(&self, delivery: &Delivery) -> Outcome {
        let attributes = EventAttributes::of(delivery);
        let Some(topic) = self.config.topic_for(&delivery.event_type) else {
            return Outcome::Permanent {
                status: None,
                reason: format!("no topic route matches the event type {}", delivery.event_type),
            };
        };
        let key = attributes.object_id.clone().unwrap_or_else(|| delivery.stripe_event_id.clone());
        let size = delivery.body.len()
            + key.len()
            + attributes.pairs.iter().map(|(name, value)| name.len() + value.len()).sum::<usize>();
        if size > self.config.max_message_bytes {
            return Outcome::Permanent {
                status: None,
                reason: format!(
                    "the message is {size} bytes (value, key and headers), over the destination's max_message_bytes of {} bytes",
                    self.config.max_message_bytes
                ),
            };
        }
        let producer = match self.producer().await {
            Ok(producer) => producer,
            Err(outcome) => return outcome,
        };
        let mut headers = OwnedHeaders::new_with_capacity(attributes.pairs.len());
        for (name, value) in &attributes.pairs {
            headers = headers.insert(Header { key: name, value: Some(value.as_bytes()) });
        }
        let record = FutureRecord::to(topic).key(key.as_bytes()).payload(&delivery.body[..]).headers(headers);
        // Waiting for room in librdkafka's queue counts against the same timeout.
        let sent = producer.send(record, Timeout::After(self.timeout)).await;
        if sent.is_err() {
            self.discard_if_fatal(&producer);
        }
        match sent {
            Ok(_) => {
                self.health.succeeded();
                Outcome::Delivered { status: None }
            }
            Err((error, _)) => {
                let code = error.rdkafka_error_code();
                let outcome = match code {
                    Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidMessageSize) => {
                        Outcome::Permanent {
                            status: None,
                            reason: format!("Kafka refused the message of {size} bytes as too large: {error}"),
                        }
                    }
                    Some(RDKafkaErrorCode::InvalidMessage) => {
                        Outcome::Permanent { status: None, reason: format!("Kafka refused the message: {error}") }
                    }
                    Some(RDKafkaErrorCode::MessageTimedOut) => Outcome::Transient {
                        status: None,
                        reason: format!(
                            "no broker acknowledgement within {}",
                            humantime::format_duration(self.timeout)
                        ),
                    },
                    _ => Outcome::Transient {
                        status: None,
                        reason: format!("Kafka: {}", first_line(&error.to_string())),
                    },
                };
                if let Outcome::Transient { reason, .. } = &outcome {
                    self.health.failed(&word(code), reason.clone());
                } else {
                    self.health.metrics.destination_error(&self.name, "kafka_message_refused");
                }
                outcome
            }
        }
    }
}

fn first_line(text: &str) -> String {
    text.lines().next().unwrap_or_default().chars().take(160).collect()
}

impl Destination for KafkaDestination {
    fn name(&self) -> &str {
        &self.name
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    fn deliver<'a>(&'a self, delivery: &'a Delivery) -> BoxFuture<'a, Outcome> {
        Box::pin(async move {
            match tokio::time::timeout(self.timeout, self.attempt(delivery)).await {
                Ok(outcome) => outcome,
                Err(_) => {
                    // librdkafka's own message timeout is the same length but checked about once a
                    // second, so this one usually fires first (a paused broker): it must count
                    // as the producer's failure too, or `/readyz` would not name the destination.
                    let reason =
                        format!("no broker acknowledgement within {}", humantime::format_duration(self.timeout));
                    self.health.failed("kafka_message_timed_out", reason.clone());
                    Outcome::Transient { status: None, reason }
                }
            }
        })
    }

    fn readiness(&self) -> Option<String> {
        let last = self.health.last_error.lock().unwrap_or_else(|e| e.into_inner()).clone();
        last.map(|reason| format!("webhook destination `{}` (kafka): {reason}", self.name))
    }
}

/// The conformance suite on librdkafka's mock cluster (an in-process Kafka protocol broker that
/// keeps messages, acknowledges with `acks=all`, and can take a broker down and back). The
/// end-to-end tests (tests/tests/webhooks_brokers.rs) use a real broker process instead.
#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Instant;

    use bytes::Bytes;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::RDKafkaRespErr;
    use rdkafka::{Message, Offset, TopicPartitionList};
    use uuid::Uuid;

    use super::*;
    use crate::conformance::{Harness, Received};

    const TOPIC: &str = "conformance";
    const REFUSED: &str = "conformance-refused";

    /// The mock cluster lives on its own thread (it is not `Send`); outages are commands to it.
    struct KafkaHarness {
        bootstrap: String,
        commands: mpsc::Sender<bool>,
        closed: std::net::SocketAddr,
        hanging: std::net::SocketAddr,
        secrets: SecretStore,
        _hanging: std::net::TcpListener,
    }

    impl KafkaHarness {
        fn start(secrets: SecretStore) -> KafkaHarness {
            let (commands, orders) = mpsc::channel::<bool>();
            let (ready, bootstrap) = mpsc::channel::<String>();
            std::thread::spawn(move || {
                let cluster = MockCluster::new(1).unwrap_or_else(|e| panic!("{e}"));
                cluster.create_topic(TOPIC, 3, 1).unwrap_or_else(|e| panic!("{e}"));
                cluster.create_topic(REFUSED, 1, 1).unwrap_or_else(|e| panic!("{e}"));
                cluster
                    .topic_error(REFUSED, RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED)
                    .unwrap_or_else(|e| panic!("{e}"));
                let _ = ready.send(cluster.bootstrap_servers());
                // `true`: the broker goes down; `false`: it comes back. Ends with the harness.
                while let Ok(down) = orders.recv() {
                    let _ = if down { cluster.broker_down(1) } else { cluster.broker_up(1) };
                }
            });
            let bootstrap = bootstrap.recv().unwrap_or_else(|e| panic!("{e}"));
            let closed = std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .unwrap_or_else(|e| panic!("{e}"));
            // Accepts connections (the kernel's backlog) and never answers.
            let hanging_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| panic!("{e}"));
            let hanging = hanging_listener.local_addr().unwrap_or_else(|e| panic!("{e}"));
            KafkaHarness { bootstrap, commands, closed, hanging, secrets, _hanging: hanging_listener }
        }

        fn destination(&self, brokers: &str, topic: &str) -> Arc<dyn Destination> {
            let config: DestinationConfig = serde_json::from_value(serde_json::json!({
                "name": "conformance-kafka",
                "kind": "kafka",
                "timeout": "1s",
                "kafka": {"brokers": [brokers], "topic": topic, "max_message_bytes": 100_000},
            }))
            .unwrap_or_else(|e| panic!("{e}"));
            let metrics = Arc::new(Metrics::new());
            Arc::new(KafkaDestination::new(&config, self.secrets.clone(), metrics).unwrap_or_else(|e| panic!("{e}")))
        }
    }

    impl Harness for KafkaHarness {
        fn accepting(&self) -> Arc<dyn Destination> {
            self.destination(&self.bootstrap, TOPIC)
        }
        fn refusing(&self) -> Arc<dyn Destination> {
            self.destination(&self.bootstrap, REFUSED)
        }
        fn unreachable(&self) -> Arc<dyn Destination> {
            self.destination(&self.closed.to_string(), TOPIC)
        }
        fn hanging(&self) -> Arc<dyn Destination> {
            self.destination(&self.hanging.to_string(), TOPIC)
        }
        fn received(&self) -> BoxFuture<'_, Vec<Received>> {
            Box::pin(async move {
                let consumer: BaseConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &self.bootstrap)
                    .set("group.id", format!("conformance-{}", Uuid::new_v4()))
                    .set("enable.auto.commit", "false")
                    .create()
                    .unwrap_or_else(|e| panic!("{e}"));
                let mut partitions = TopicPartitionList::new();
                for p in 0..3 {
                    let _ = partitions.add_partition_offset(TOPIC, p, Offset::Beginning);
                }
                consumer.assign(&partitions).unwrap_or_else(|e| panic!("{e}"));
                let mut received = Vec::new();
                let mut quiet_since = Instant::now();
                while quiet_since.elapsed() < Duration::from_millis(700) {
                    if let Some(Ok(message)) = consumer.poll(Duration::from_millis(100)) {
                        quiet_since = Instant::now();
                        let event_id = message.headers().and_then(|headers| {
                            headers
                                .iter()
                                .find(|h| h.key == crate::destination::EVENT_ID_HEADER)
                                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse::<Uuid>().ok())
                        });
                        if let (Some(event_id), Some(body)) = (event_id, message.payload()) {
                            received.push(Received { event_id, body: Bytes::copy_from_slice(body) });
                        }
                    }
                }
                received
            })
        }
        fn outage(&self) -> BoxFuture<'_, ()> {
            let _ = self.commands.send(true);
            Box::pin(async {})
        }
        fn restore(&self) -> BoxFuture<'_, ()> {
            let _ = self.commands.send(false);
            Box::pin(async {})
        }
        fn oversized_body(&self) -> Option<usize> {
            Some(150_000)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn kafka_destination_passes_the_conformance_suite_on_the_mock_cluster() {
        let secrets =
            SecretStore::new(&keygate_secrets::SecretsConfig::default()).await.unwrap_or_else(|e| panic!("{e}"));
        let harness = KafkaHarness::start(secrets);
        crate::conformance::run(&harness).await;
    }
}
