//! The `webhooks:` section of keygate's configuration.
//!
//! Parsed by keygate's configuration loader (proxy/src/config.rs), which reports unknown keys of
//! every section at once (`serde_ignored`), then validated here by [`WebhooksConfig::validate`],
//! which returns every problem (one line each, naming the key) rather than the first.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use keygate_secrets::SecretRef;
use serde::Deserialize;

/// The whole `webhooks:` section.
#[derive(Debug, Clone, Deserialize)]
pub struct WebhooksConfig {
    /// The ingress listener (it faces the internet; the egress listener does not).
    #[serde(default)]
    pub listen: IngressListenConfig,
    /// Folder of the local delivery state (pending deliveries, dead letters, the dedup index).
    /// Default `keygate-data/webhooks` (relative to the working directory). One keygate process
    /// per folder.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// How long a Stripe event id is remembered: a retry or resend within this window is
    /// acknowledged and recorded as a duplicate, not delivered again. It is also how long event
    /// bodies are kept locally for replay. Default 7 days (Stripe retries for up to 3).
    #[serde(default = "default_dedup_window", with = "humantime_serde")]
    pub dedup_window: Duration,
    /// Limits that protect the ingress from senders.
    #[serde(default)]
    pub limits: IngressLimits,
    /// Bearer tokens of the operator endpoints on the admin listener (`/webhooks/…`): secret
    /// references. Without any, those endpoints answer 403.
    #[serde(default)]
    pub admin_tokens: Vec<SecretRef>,
    /// One entry per Stripe webhook endpoint (`/webhooks/stripe/<name>`).
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
}

/// Where the ingress listens.
#[derive(Debug, Clone, Deserialize)]
pub struct IngressListenConfig {
    /// Address and port. Default `127.0.0.1:8443`.
    #[serde(default = "default_ingress_address")]
    pub address: SocketAddr,
    /// TLS on the ingress; plain HTTP when absent (behind a TLS-terminating load balancer).
    #[serde(default)]
    pub tls: Option<IngressTlsConfig>,
}

impl Default for IngressListenConfig {
    fn default() -> Self {
        IngressListenConfig { address: default_ingress_address(), tls: None }
    }
}

/// TLS certificate and key of the ingress (Stripe does not present client certificates).
#[derive(Debug, Clone, Deserialize)]
pub struct IngressTlsConfig {
    /// PEM file with the server certificate chain.
    pub cert_file: PathBuf,
    /// PEM file with the server private key.
    pub key_file: PathBuf,
}

/// Bounds on what one sender can make the ingress hold.
#[derive(Debug, Clone, Deserialize)]
pub struct IngressLimits {
    /// From accept, a sender must finish TLS and send a whole request head within this time.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A sender must send its whole body within this time (answered 408 beyond).
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// A connection with no request for this long is closed.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most connections served at once; more wait in the accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Largest request head (answered 431 beyond).
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
}

impl Default for IngressLimits {
    fn default() -> Self {
        IngressLimits {
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            max_header_bytes: default_max_header_bytes(),
        }
    }
}

/// One Stripe webhook endpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct EndpointConfig {
    /// The last path segment: Stripe posts to `/webhooks/stripe/<name>`. `[a-z0-9_-]`, 1 to 64.
    pub name: String,
    /// The endpoint's signing secrets (`whsec_…`) as secret references. A list, so that while
    /// Stripe rolls a secret both the new one and its predecessor verify.
    pub secrets: Vec<SecretRef>,
    /// Largest age (and, against clock skew, the largest lead) of the signature's timestamp.
    /// Default 300 s, as in Stripe's SDKs; 0 is refused (it would disable the check).
    #[serde(default = "default_tolerance", with = "humantime_serde")]
    pub tolerance: Duration,
    /// Largest event body accepted (answered 413 beyond). Default 1 MiB.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Where verified events go.
    #[serde(default)]
    pub destinations: Vec<DestinationConfig>,
}

/// One destination of an endpoint's events.
///
/// `kind` selects the implementation (`http` when absent, so that configurations written before
/// brokers existed keep their meaning); the kind's own settings are `url`/`secret` for `http`, the
/// `kafka:` section for `kafka` and the `sqs:` section for `sqs`. Settings of another kind are
/// refused at start, naming the key. The remaining keys (events, timeout, concurrency, retries)
/// mean the same for every kind.
#[derive(Debug, Clone, Deserialize)]
pub struct DestinationConfig {
    /// Unique across every endpoint: dead letters and replays name it. `[a-z0-9_-]`, 1 to 64.
    pub name: String,
    /// `http` (the default), `kafka` or `sqs`.
    #[serde(default)]
    pub kind: DestinationKind,
    /// `http`: where events are POSTed (`http://` or `https://`).
    #[serde(default)]
    pub url: Option<String>,
    /// `http`: the secret keygate signs each delivery with, in Stripe's scheme: give its value to
    /// the consumer, which verifies with the official SDK's `construct_event` / `constructEvent`.
    #[serde(default)]
    pub secret: Option<SecretRef>,
    /// Event types delivered here: exact (`charge.dispute.created`), a prefix (`invoice.*`) or
    /// everything (`*`). Default `["*"]`.
    #[serde(default = "default_events")]
    pub events: Vec<String>,
    /// Longest one delivery may take (connect, send, answer or broker acknowledgement).
    /// Default 10 s.
    #[serde(default = "default_delivery_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Most deliveries in flight to this destination at once. Default 8.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// How long a failing event is retried before it is dead-lettered, counted from its first
    /// failed attempt. Default 3 days.
    #[serde(default = "default_retry_for", with = "humantime_serde")]
    pub retry_for: Duration,
    /// Delay before the first retry; each later one doubles it (with jitter). Default 5 s.
    #[serde(default = "default_initial_backoff", with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// Longest delay between two attempts. Default 1 h.
    #[serde(default = "default_max_backoff", with = "humantime_serde")]
    pub max_backoff: Duration,
    /// `http` and `kafka`: extra PEM CA certificates trusted for this destination's TLS (HTTP:
    /// besides the Mozilla roots; Kafka: instead of the system's CA store).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `kafka`: brokers, topics, security.
    #[serde(default)]
    pub kafka: Option<KafkaConfig>,
    /// `sqs`: the queue and the AWS client settings.
    #[serde(default)]
    pub sqs: Option<SqsConfig>,
}

/// Which implementation a destination uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DestinationKind {
    /// POST to a URL, signed in Stripe's scheme.
    #[default]
    Http,
    /// Produce to Apache Kafka (librdkafka, idempotent, `acks=all`).
    Kafka,
    /// Send to an Amazon SQS queue (standard or FIFO).
    Sqs,
}

impl DestinationKind {
    /// The word used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            DestinationKind::Http => "http",
            DestinationKind::Kafka => "kafka",
            DestinationKind::Sqs => "sqs",
        }
    }
}

/// The `kafka:` section of a `kind: kafka` destination.
#[derive(Debug, Clone, Deserialize)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port` each.
    pub brokers: Vec<String>,
    /// The topic of every event no entry of `routes` takes.
    #[serde(default)]
    pub topic: Option<String>,
    /// Topics per event type: the first entry whose `events` match takes the event.
    #[serde(default)]
    pub routes: Vec<KafkaRoute>,
    /// `plaintext` (default), `ssl`, `sasl_plaintext` or `sasl_ssl`.
    #[serde(default)]
    pub security_protocol: KafkaSecurityProtocol,
    /// SASL credentials (with `sasl_plaintext` or `sasl_ssl`).
    #[serde(default)]
    pub sasl: Option<KafkaSasl>,
    /// Largest message the producer sends (`message.max.bytes`); a bigger event is dead-lettered
    /// at once. Default 1,000,000 (Kafka's default broker limit).
    #[serde(default = "default_kafka_max_message_bytes")]
    pub max_message_bytes: usize,
    /// How long the producer waits to batch messages (`linger.ms`). Default 5 ms.
    #[serde(default = "default_kafka_linger", with = "humantime_serde")]
    pub linger: Duration,
}

/// One topic route of a Kafka destination.
#[derive(Debug, Clone, Deserialize)]
pub struct KafkaRoute {
    /// Event type filters, as a destination's `events`.
    pub events: Vec<String>,
    /// The topic those events go to.
    pub topic: String,
}

/// Kafka's `security.protocol`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KafkaSecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl KafkaSecurityProtocol {
    /// librdkafka's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSecurityProtocol::Plaintext => "plaintext",
            KafkaSecurityProtocol::Ssl => "ssl",
            KafkaSecurityProtocol::SaslPlaintext => "sasl_plaintext",
            KafkaSecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
    fn uses_sasl(self) -> bool {
        matches!(self, KafkaSecurityProtocol::SaslPlaintext | KafkaSecurityProtocol::SaslSsl)
    }
}

/// SASL credentials of a Kafka destination.
#[derive(Debug, Clone, Deserialize)]
pub struct KafkaSasl {
    /// `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512`.
    pub mechanism: KafkaSaslMechanism,
    /// The user name (not a secret).
    pub username: String,
    /// The password, as a secret reference (`env://`, `file://`, `vault://`, `aws-sm://`).
    pub password: SecretRef,
}

/// A SASL mechanism librdkafka implements without Kerberos.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum KafkaSaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl KafkaSaslMechanism {
    /// librdkafka's spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            KafkaSaslMechanism::Plain => "PLAIN",
            KafkaSaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            KafkaSaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// The `sqs:` section of a `kind: sqs` destination.
#[derive(Debug, Clone, Deserialize)]
pub struct SqsConfig {
    /// The queue URL (`https://sqs.<region>.amazonaws.com/<account>/<name>`); a name ending in
    /// `.fifo` is a FIFO queue.
    pub queue_url: String,
    /// Region, endpoint override, profile and credentials file, as `secrets.aws`.
    #[serde(default)]
    pub aws: keygate_secrets::AwsConfig,
    /// Largest message (body plus attributes) sent; a bigger event is dead-lettered at once.
    /// Default 262,144 (256 KiB, the limit every SQS-compatible service accepts); at most
    /// 1,048,576 (SQS's limit since August 2025).
    #[serde(default = "default_sqs_max_message_bytes")]
    pub max_message_bytes: usize,
}

impl SqsConfig {
    /// Whether the queue is a FIFO queue (its name ends in `.fifo`).
    pub fn is_fifo(&self) -> bool {
        self.queue_url.trim_end_matches('/').ends_with(".fifo")
    }
}

fn default_kafka_max_message_bytes() -> usize {
    1_000_000
}
fn default_kafka_linger() -> Duration {
    Duration::from_millis(5)
}
fn default_sqs_max_message_bytes() -> usize {
    256 * 1024
}

fn default_state_dir() -> PathBuf {
    PathBuf::from("keygate-data/webhooks")
}
fn default_dedup_window() -> Duration {
    Duration::from_secs(7 * 24 * 3600)
}
fn default_ingress_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> usize {
    1024
}
fn default_max_header_bytes() -> usize {
    16 * 1024
}
fn default_tolerance() -> Duration {
    Duration::from_secs(300)
}
fn default_max_body_bytes() -> u64 {
    1024 * 1024
}
fn default_events() -> Vec<String> {
    vec!["*".to_owned()]
}
fn default_delivery_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_concurrency() -> usize {
    8
}
fn default_retry_for() -> Duration {
    Duration::from_secs(3 * 24 * 3600)
}
fn default_initial_backoff() -> Duration {
    Duration::from_secs(5)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(3600)
}

/// The largest event body an endpoint may accept: Stripe's events are far smaller, and a body is
/// held whole in memory, in the state file and in the lake.
pub const MAX_EVENT_BODY_BYTES: u64 = 16 * 1024 * 1024;

/// Whether `name` is a valid endpoint or destination name.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

impl WebhooksConfig {
    /// Every semantic problem, one line each, keys written from the section's root
    /// (`webhooks.endpoints[0].tolerance`).
    pub fn validate(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.endpoints.is_empty() {
            problems.push(
                "`webhooks.endpoints` is empty: add at least one endpoint (name, secrets, destinations), \
                 or remove the `webhooks` section"
                    .to_owned(),
            );
        }
        if self.dedup_window < Duration::from_secs(1) {
            problems.push("`webhooks.dedup_window` must be at least 1s (Stripe retries for up to 3 days)".into());
        }
        for (key, value) in [
            ("header_read_timeout", self.limits.header_read_timeout),
            ("body_read_timeout", self.limits.body_read_timeout),
            ("idle_timeout", self.limits.idle_timeout),
        ] {
            if value.is_zero() {
                problems.push(format!("`webhooks.limits.{key}` must be longer than 0s"));
            }
        }
        if self.limits.max_connections == 0 {
            problems.push("`webhooks.limits.max_connections` must be at least 1".into());
        }
        if self.limits.max_header_bytes < 1024 {
            problems.push("`webhooks.limits.max_header_bytes` must be at least 1024".into());
        }
        if let Some(tls) = &self.listen.tls {
            for (key, path) in [("cert_file", &tls.cert_file), ("key_file", &tls.key_file)] {
                if !path.is_file() {
                    problems.push(format!("`webhooks.listen.tls.{key}`: {} is not a readable file", path.display()));
                }
            }
        }
        for (index, reference) in self.admin_tokens.iter().enumerate() {
            if !reference.is_fetchable() {
                problems.push(format!("`webhooks.admin_tokens[{index}]`: {reference} is not a secret with a value"));
            }
        }
        let mut endpoints = BTreeSet::new();
        let mut destinations = BTreeSet::new();
        for (index, endpoint) in self.endpoints.iter().enumerate() {
            let key = format!("webhooks.endpoints[{index}]");
            if !valid_name(&endpoint.name) {
                problems.push(format!("`{key}.name` must be 1 to 64 of a-z, 0-9, `_` and `-` (it is a URL segment)"));
            } else if !endpoints.insert(endpoint.name.clone()) {
                problems.push(format!("`{key}.name`: endpoint `{}` is configured twice", endpoint.name));
            }
            if endpoint.secrets.is_empty() {
                problems.push(format!(
                    "`{key}.secrets` is empty: give the endpoint's signing secret (whsec_…) as a secret reference"
                ));
            }
            for (i, reference) in endpoint.secrets.iter().enumerate() {
                if !reference.is_fetchable() {
                    problems.push(format!("`{key}.secrets[{i}]`: {reference} is not a secret with a value"));
                }
            }
            if endpoint.tolerance.is_zero() {
                problems.push(format!(
                    "`{key}.tolerance` must be longer than 0s: 0 would accept a signature of any age (Stripe's SDKs use 300s)"
                ));
            }
            if endpoint.max_body_bytes == 0 || endpoint.max_body_bytes > MAX_EVENT_BODY_BYTES {
                problems.push(format!("`{key}.max_body_bytes` must be between 1 and {MAX_EVENT_BODY_BYTES}"));
            }
            if endpoint.destinations.is_empty() {
                problems.push(format!("`{key}.destinations` is empty: add where the endpoint's events go"));
            }
            for (d, destination) in endpoint.destinations.iter().enumerate() {
                problems.extend(destination.validate(&format!("{key}.destinations[{d}]")));
                if valid_name(&destination.name) && !destinations.insert(destination.name.clone()) {
                    problems.push(format!(
                        "`{key}.destinations[{d}].name`: destination `{}` is configured twice (names are unique across endpoints)",
                        destination.name
                    ));
                }
            }
        }
        problems
    }

    /// Every secret reference the section names (for preloading and readiness).
    pub fn secret_refs(&self) -> Vec<SecretRef> {
        let mut refs: Vec<SecretRef> = self.admin_tokens.clone();
        for endpoint in &self.endpoints {
            refs.extend(endpoint.secrets.iter().cloned());
            for destination in &endpoint.destinations {
                refs.extend(destination.secret.iter().cloned());
                if let Some(sasl) = destination.kafka.as_ref().and_then(|k| k.sasl.as_ref()) {
                    refs.push(sasl.password.clone());
                }
            }
        }
        refs.sort();
        refs.dedup();
        refs
    }
}

impl DestinationConfig {
    /// Every problem of this destination's settings, one line each, keys written under `key`
    /// (`webhooks.endpoints[0].destinations[1]`, `alerts.destinations[0]`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if !valid_name(&self.name) {
            problems.push(format!("`{key}.name` must be 1 to 64 of a-z, 0-9, `_` and `-`"));
        }
        let kind = self.kind.as_str();
        let foreign = |present: bool, setting: &str, owner: &str, problems: &mut Vec<String>| {
            if present {
                problems.push(format!(
                    "`{key}.{setting}` is a setting of `kind: {owner}` destinations, but this one is `kind: {kind}`"
                ));
            }
        };
        match self.kind {
            DestinationKind::Http => {
                match &self.url {
                    None => problems.push(format!("`{key}.url` is missing: where events are POSTed (https://…)")),
                    Some(url) => {
                        if let Err(problem) = parse_destination_url(url) {
                            problems.push(format!("`{key}.url`: {problem}"));
                        }
                    }
                }
                match &self.secret {
                    None => problems
                        .push(format!("`{key}.secret` is missing: the secret reference keygate signs deliveries with")),
                    Some(secret) if !secret.is_fetchable() => {
                        problems.push(format!("`{key}.secret`: {secret} is not a secret with a value"));
                    }
                    Some(_) => {}
                }
                foreign(self.kafka.is_some(), "kafka", "kafka", &mut problems);
                foreign(self.sqs.is_some(), "sqs", "sqs", &mut problems);
            }
            DestinationKind::Kafka => {
                foreign(self.url.is_some(), "url", "http", &mut problems);
                foreign(self.secret.is_some(), "secret", "http", &mut problems);
                foreign(self.sqs.is_some(), "sqs", "sqs", &mut problems);
                match &self.kafka {
                    None => problems.push(format!("`{key}.kafka` is missing: brokers and topic of the destination")),
                    Some(kafka) => problems.extend(kafka.validate(&format!("{key}.kafka"))),
                }
            }
            DestinationKind::Sqs => {
                foreign(self.url.is_some(), "url", "http", &mut problems);
                foreign(self.secret.is_some(), "secret", "http", &mut problems);
                foreign(self.kafka.is_some(), "kafka", "kafka", &mut problems);
                foreign(self.ca_file.is_some(), "ca_file", "http or kafka", &mut problems);
                match &self.sqs {
                    None => problems.push(format!("`{key}.sqs` is missing: the queue_url of the destination")),
                    Some(sqs) => problems.extend(sqs.validate(&format!("{key}.sqs"))),
                }
            }
        }
        if self.events.is_empty() {
            problems.push(format!("`{key}.events` is empty: use [\"*\"] for every event"));
        }
        for (i, filter) in self.events.iter().enumerate() {
            if let Err(problem) = EventFilter::parse(filter) {
                problems.push(format!("`{key}.events[{i}]`: {problem}"));
            }
        }
        for (name, value) in [("timeout", self.timeout), ("initial_backoff", self.initial_backoff)] {
            if value.is_zero() {
                problems.push(format!("`{key}.{name}` must be longer than 0s"));
            }
        }
        if self.max_backoff < self.initial_backoff {
            problems.push(format!("`{key}.max_backoff` must be at least `initial_backoff`"));
        }
        if self.concurrency == 0 || self.concurrency > 1024 {
            problems.push(format!("`{key}.concurrency` must be between 1 and 1024"));
        }
        if let Some(path) = &self.ca_file
            && !path.is_file()
        {
            problems.push(format!("`{key}.ca_file`: {} is not a readable file", path.display()));
        }
        problems
    }

    /// The parsed event filters (invalid ones were refused at load).
    pub fn filters(&self) -> Vec<EventFilter> {
        self.events.iter().filter_map(|f| EventFilter::parse(f).ok()).collect()
    }
}

/// Whether `topic` is a valid Kafka topic name: 1 to 249 of `[a-zA-Z0-9._-]`, not `.` or `..`.
fn valid_topic(topic: &str) -> bool {
    (1..=249).contains(&topic.len())
        && topic != "."
        && topic != ".."
        && topic.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
}

impl KafkaConfig {
    fn validate(&self, key: &str) -> Vec<String> {
        let mut problems = Vec::new();
        if self.brokers.is_empty() {
            problems.push(format!("`{key}.brokers` is empty: give at least one bootstrap broker as host:port"));
        }
        for (i, broker) in self.brokers.iter().enumerate() {
            let port = broker.rsplit_once(':').and_then(|(host, port)| (!host.is_empty()).then_some(port));
            if port.and_then(|p| p.parse::<u16>().ok()).is_none() || broker.contains("://") || broker.contains(',') {
                problems.push(format!("`{key}.brokers[{i}]` must be host:port (e.g. kafka-1.internal:9093)"));
            }
        }
        if self.topic.is_none() && self.routes.is_empty() {
            problems.push(format!("`{key}.topic` is missing: give the topic events go to (or `routes`)"));
        }
        if let Some(topic) = &self.topic
            && !valid_topic(topic)
        {
            problems.push(format!("`{key}.topic` must be 1 to 249 of a-z, A-Z, 0-9, `.`, `_` and `-`"));
        }
        for (r, route) in self.routes.iter().enumerate() {
            if !valid_topic(&route.topic) {
                problems.push(format!("`{key}.routes[{r}].topic` must be 1 to 249 of a-z, A-Z, 0-9, `.`, `_` and `-`"));
            }
            if route.events.is_empty() {
                problems.push(format!("`{key}.routes[{r}].events` is empty"));
            }
            for (i, filter) in route.events.iter().enumerate() {
                if let Err(problem) = EventFilter::parse(filter) {
                    problems.push(format!("`{key}.routes[{r}].events[{i}]`: {problem}"));
                }
            }
        }
        match (&self.sasl, self.security_protocol.uses_sasl()) {
            (None, true) => problems.push(format!(
                "`{key}.sasl` is missing: `security_protocol: {}` needs a mechanism, username and password",
                self.security_protocol.as_str()
            )),
            (Some(_), false) => problems.push(format!(
                "`{key}.sasl` is given but `security_protocol` is `{}`: use sasl_ssl (or sasl_plaintext)",
                self.security_protocol.as_str()
            )),
            (Some(sasl), true) => {
                if sasl.username.is_empty() {
                    problems.push(format!("`{key}.sasl.username` is empty"));
                }
                if !sasl.password.is_fetchable() {
                    problems.push(format!("`{key}.sasl.password`: {} is not a secret with a value", sasl.password));
                }
            }
            (None, false) => {}
        }
        if !(1000..=100_000_000).contains(&self.max_message_bytes) {
            problems.push(format!("`{key}.max_message_bytes` must be between 1000 and 100000000"));
        }
        if self.linger > Duration::from_secs(1) {
            problems.push(format!("`{key}.linger` must be at most 1s"));
        }
        problems
    }

    /// The topic of an event type: the first matching route's, else `topic`.
    pub fn topic_for(&self, event_type: &str) -> Option<&str> {
        self.routes
            .iter()
            .find(|r| r.events.iter().filter_map(|f| EventFilter::parse(f).ok()).any(|f| f.matches(event_type)))
            .map(|r| r.topic.as_str())
            .or(self.topic.as_deref())
    }
}

impl SqsConfig {
    fn validate(&self, key: &str) -> Vec<String> {
        let mut problems = Vec::new();
        match self.queue_url.parse::<http::Uri>() {
            Ok(uri)
                if matches!(uri.scheme_str(), Some("http" | "https"))
                    && uri.authority().is_some()
                    && uri.path().trim_matches('/').contains('/') => {}
            _ => problems.push(format!(
                "`{key}.queue_url` must be a queue URL, e.g. https://sqs.eu-west-1.amazonaws.com/123456789012/stripe-events"
            )),
        }
        if !(1024..=1024 * 1024).contains(&self.max_message_bytes) {
            problems.push(format!("`{key}.max_message_bytes` must be between 1024 and 1048576 (SQS's limit)"));
        }
        if let Some(endpoint) = &self.aws.endpoint_url
            && parse_destination_url(endpoint).is_err()
        {
            problems.push(format!("`{key}.aws.endpoint_url` must be an http(s) URL without credentials"));
        }
        if let Some(file) = &self.aws.credentials_file
            && !file.is_file()
        {
            problems.push(format!("`{key}.aws.credentials_file`: {} is not a readable file", file.display()));
        }
        problems
    }
}

/// Checks a destination URL: `http` or `https`, a host, no user info.
pub fn parse_destination_url(text: &str) -> Result<http::Uri, String> {
    let uri: http::Uri =
        text.parse().map_err(|_| "not a URL; expected e.g. https://billing.internal/stripe".to_owned())?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("the scheme must be http or https".into()),
    }
    match uri.authority() {
        None => return Err("the URL has no host".into()),
        Some(authority) if authority.as_str().contains('@') => {
            return Err("the URL must not carry credentials: deliveries are signed instead".into());
        }
        Some(_) => {}
    }
    Ok(uri)
}

/// One event-type filter of a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventFilter {
    /// `*`: every event.
    All,
    /// `invoice.*`: every type that starts with `invoice.`.
    Prefix(String),
    /// `charge.dispute.created`: that type only.
    Exact(String),
}

impl EventFilter {
    /// Parses `*`, `prefix.*` or an exact type (`[a-z0-9_.]`, no empty segment).
    pub fn parse(text: &str) -> Result<EventFilter, String> {
        if text == "*" {
            return Ok(EventFilter::All);
        }
        let (body, prefix) = match text.strip_suffix(".*") {
            Some(body) => (body, true),
            None => (text, false),
        };
        let valid_segment = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if body.is_empty() || !body.split('.').all(valid_segment) {
            return Err(format!(
                "`{}` is not an event type filter: use `*`, `invoice.*` or an exact type such as `charge.dispute.created`",
                text.escape_default()
            ));
        }
        Ok(if prefix { EventFilter::Prefix(format!("{body}.")) } else { EventFilter::Exact(body.to_owned()) })
    }

    /// Whether an event of type `event_type` passes.
    pub fn matches(&self, event_type: &str) -> bool {
        match self {
            EventFilter::All => true,
            EventFilter::Prefix(prefix) => event_type.starts_with(prefix.as_str()),
            EventFilter::Exact(exact) => event_type == exact,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> WebhooksConfig {
        serde_json::from_value(serde_json::from_str(yaml).unwrap_or_else(|e| panic!("{e}")))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn base() -> serde_json::Value {
        serde_json::json!({
            "endpoints": [{
                "name": "main",
                "secrets": ["env://WHSEC"],
                "destinations": [{"name": "billing", "url": "http://127.0.0.1:1/hook", "secret": "env://DEST"}]
            }]
        })
    }

    #[test]
    fn defaults_are_stripes_and_a_production_gateways() {
        let config = parse(&base().to_string());
        assert!(config.validate().is_empty(), "{:?}", config.validate());
        let endpoint = &config.endpoints[0];
        assert_eq!(endpoint.tolerance, Duration::from_secs(300));
        assert_eq!(endpoint.destinations[0].retry_for, Duration::from_secs(3 * 24 * 3600));
        assert!(config.dedup_window >= Duration::from_secs(3 * 24 * 3600));
        assert_eq!(endpoint.destinations[0].filters(), vec![EventFilter::All]);
    }

    #[test]
    fn zero_tolerance_and_other_mistakes_are_all_reported() {
        let mut value = base();
        value["endpoints"][0]["tolerance"] = "0s".into();
        value["endpoints"][0]["secrets"] = serde_json::json!([]);
        value["endpoints"][0]["destinations"][0]["events"] = serde_json::json!(["invoice.*", "inv*ce", "a..b"]);
        value["endpoints"][0]["destinations"][0]["url"] = "ftp://x".into();
        if let Some(destinations) = value["endpoints"][0]["destinations"].as_array_mut() {
            destinations.push(destinations[0].clone());
        }
        let problems = parse(&value.to_string()).validate().join("\n");
        for expected in [
            "`webhooks.endpoints[0].tolerance` must be longer than 0s",
            "`webhooks.endpoints[0].secrets` is empty",
            "`webhooks.endpoints[0].destinations[0].events[1]`",
            "`webhooks.endpoints[0].destinations[0].events[2]`",
            "`webhooks.endpoints[0].destinations[0].url`: the scheme must be http or https",
            "destination `billing` is configured twice",
        ] {
            assert!(problems.contains(expected), "missing {expected:?} in\n{problems}");
        }
    }

    #[test]
    fn filters_match_exact_types_prefixes_and_everything() {
        let prefix = EventFilter::parse("invoice.*").unwrap_or_else(|e| panic!("{e}"));
        assert!(prefix.matches("invoice.paid"));
        assert!(prefix.matches("invoice.payment_action.required"));
        assert!(!prefix.matches("invoice"));
        assert!(!prefix.matches("invoiceitem.created"));
        let exact = EventFilter::parse("charge.dispute.created").unwrap_or_else(|e| panic!("{e}"));
        assert!(exact.matches("charge.dispute.created"));
        assert!(!exact.matches("charge.dispute.closed"));
        assert!(EventFilter::parse("*").is_ok_and(|f| f.matches("v1.billing.meter.error_report_triggered")));
        assert!(EventFilter::parse("*.created").is_err());
    }
}
