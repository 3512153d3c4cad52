//! Webhook destinations on brokers, end to end: Apache Kafka (the `tansu` Kafka-protocol broker,
//! read back with confluent-kafka) and Amazon SQS (moto, read back with boto3). Events are posted
//! to keygate's ingress signed by the official Node SDK's test helper, as in webhooks_e2e.rs.
//! The destination conformance suite runs here for Kafka and SQS against the same real brokers
//! (HTTP, and Kafka on librdkafka's mock cluster, run it in keygate-webhooks' unit tests).
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::BoxFuture;
use keygate_secrets::SecretStore;
use keygate_tests::brokers::{Tansu, sqs_create_queue, sqs_read};
use keygate_tests::keygate::{Keygate, KeygateOptions};
use keygate_tests::moto::Moto;
use keygate_tests::proxy_setup::{CANARY_KEY, allow_all_checkout_policy, audit_yaml};
use keygate_tests::webhooks::{
    admin, endpoint_url, event, flood_through_kill_rounds, ingress_address, metric, node_send, signed, statuses,
};
use keygate_webhooks::conformance::{Harness, Received};
use keygate_webhooks::{Destination, DestinationConfig};
use serde_json::{Value, json};

const SIGNING_SECRET: &str = "whsec_brokers_SIGNINGsecret000000000";
const ADMIN_TOKEN: &str = "kg_admin_brokers_token_5555555555555555";

// ---------------------------------------------------------------------------------------------
// The conformance suite on real brokers.

/// A TCP listener that accepts connections and never answers (a hung broker).
fn hanging_listener() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream);
        }
    });
    addr
}

/// A loopback port nothing listens on.
fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

fn destination(config: Value, secrets: &SecretStore) -> Arc<dyn Destination> {
    let config: DestinationConfig = serde_json::from_value(config).unwrap();
    let problems = config.kind.as_str().to_owned();
    keygate_webhooks::destination::build(&config, secrets.clone(), Arc::new(keygate_webhooks::Metrics::new()))
        .unwrap_or_else(|e| panic!("{problems} destination: {e}"))
}

fn runtime_and_secrets() -> (tokio::runtime::Runtime, SecretStore) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let secrets = runtime.block_on(SecretStore::new(&Default::default())).unwrap();
    (runtime, secrets)
}

fn received_of(event_id: Option<&str>, body: &str) -> Option<Received> {
    Some(Received { event_id: event_id?.parse().ok()?, body: Bytes::from(body.to_owned()) })
}

struct KafkaHarness {
    secrets: SecretStore,
    tansu: Tansu,
    topic: String,
    hanging: SocketAddr,
}

impl KafkaHarness {
    fn kafka(&self, brokers: &str, topic: &str, extra: Value) -> Arc<dyn Destination> {
        let mut kafka = json!({"brokers": [brokers], "topic": topic, "max_message_bytes": 100_000});
        if let (Some(kafka), Some(extra)) = (kafka.as_object_mut(), extra.as_object()) {
            kafka.extend(extra.clone());
        }
        destination(
            json!({"name": "conformance-kafka", "kind": "kafka", "timeout": "1s", "kafka": kafka}),
            &self.secrets,
        )
    }
}

impl Harness for KafkaHarness {
    fn accepting(&self) -> Arc<dyn Destination> {
        self.kafka(&self.tansu.bootstrap(), &self.topic, json!({}))
    }
    fn refusing(&self) -> Arc<dyn Destination> {
        // The broker is there but the producer's SASL handshake is refused on its plain listener.
        let password = std::env::temp_dir().join(format!("keygate-brokers-sasl-{}", std::process::id()));
        std::fs::write(&password, "not-the-password").unwrap();
        self.kafka(
            &self.tansu.bootstrap(),
            &self.topic,
            json!({"security_protocol": "sasl_ssl", "sasl": {"mechanism": "SCRAM-SHA-512", "username": "keygate", "password": format!("file://{}", password.display())}}),
        )
    }
    fn unreachable(&self) -> Arc<dyn Destination> {
        self.kafka(&closed_port().to_string(), &self.topic, json!({}))
    }
    fn hanging(&self) -> Arc<dyn Destination> {
        self.kafka(&self.hanging.to_string(), &self.topic, json!({}))
    }
    fn received(&self) -> BoxFuture<'_, Vec<Received>> {
        let messages = self.tansu.read(&self.topic);
        let received = messages
            .iter()
            .filter_map(|m| received_of(m["headers"]["keygate-event-id"].as_str(), m["value"].as_str()?))
            .collect();
        Box::pin(async move { received })
    }
    fn outage(&self) -> BoxFuture<'_, ()> {
        self.tansu.signal("STOP");
        Box::pin(async {})
    }
    fn restore(&self) -> BoxFuture<'_, ()> {
        self.tansu.signal("CONT");
        Box::pin(async {})
    }
    fn oversized_body(&self) -> Option<usize> {
        Some(150_000)
    }
}

#[test]
fn kafka_destination_passes_the_conformance_suite() {
    let tansu = Tansu::start();
    tansu.create_topic("conformance", 3);
    let (runtime, secrets) = runtime_and_secrets();
    let harness = KafkaHarness { secrets, tansu, topic: "conformance".into(), hanging: hanging_listener() };
    runtime.block_on(keygate_webhooks::conformance::run(&harness));
}

struct SqsHarness {
    secrets: SecretStore,
    moto: Moto,
    queue_url: String,
    hanging: SocketAddr,
    seen: Mutex<Vec<Received>>,
}

impl SqsHarness {
    fn sqs(&self, endpoint: &str, queue_url: &str) -> Arc<dyn Destination> {
        destination(
            json!({
                "name": "conformance-sqs", "kind": "sqs", "timeout": "1s", "concurrency": 16,
                "sqs": {"queue_url": queue_url, "aws": {
                    "region": keygate_tests::moto::REGION, "endpoint_url": endpoint,
                    "credentials_file": self.moto.credentials_file()}}
            }),
            &self.secrets,
        )
    }
}

impl Harness for SqsHarness {
    fn accepting(&self) -> Arc<dyn Destination> {
        self.sqs(&self.moto.url(), &self.queue_url)
    }
    fn refusing(&self) -> Arc<dyn Destination> {
        // moto answers, but the queue does not exist.
        let missing = self.queue_url.replace("conformance", "no-such-queue");
        self.sqs(&self.moto.url(), &missing)
    }
    fn unreachable(&self) -> Arc<dyn Destination> {
        self.sqs(&format!("http://{}", closed_port()), &self.queue_url)
    }
    fn hanging(&self) -> Arc<dyn Destination> {
        self.sqs(&format!("http://{}", self.hanging), &self.queue_url)
    }
    fn received(&self) -> BoxFuture<'_, Vec<Received>> {
        let messages = sqs_read(&self.moto, &self.queue_url, Duration::from_millis(200));
        let mut seen = self.seen.lock().unwrap();
        seen.extend(
            messages
                .iter()
                .filter_map(|m| received_of(m["attributes"]["keygate-event-id"].as_str(), m["body"].as_str()?)),
        );
        let received = seen.clone();
        Box::pin(async move { received })
    }
    fn outage(&self) -> BoxFuture<'_, ()> {
        self.moto.signal("STOP");
        Box::pin(async {})
    }
    fn restore(&self) -> BoxFuture<'_, ()> {
        self.moto.signal("CONT");
        Box::pin(async {})
    }
    fn oversized_body(&self) -> Option<usize> {
        Some(300 * 1024)
    }
    // Also for the FIFO queue: moto deduplicates a FIFO send only against messages still in the queue,
    // and `received` reads (deletes) them before the suite re-drives; so on moto the re-drive
    // must arrive again. FIFO deduplication (SQS's five-minute window, deleted or not) is
    // checked end to end in `events_reach_sqs_standard_and_fifo_queues`, with the first copy
    // still queued.
    fn deduplicates(&self) -> bool {
        false
    }
}

#[test]
fn sqs_standard_and_fifo_destinations_pass_the_conformance_suite() {
    let (runtime, secrets) = runtime_and_secrets();
    for name in ["conformance", "conformance.fifo"] {
        let moto = Moto::start();
        let queue_url = sqs_create_queue(&moto, name);
        let harness = SqsHarness {
            secrets: secrets.clone(),
            moto,
            queue_url,
            hanging: hanging_listener(),
            seen: Mutex::new(Vec::new()),
        };
        runtime.block_on(keygate_webhooks::conformance::run(&harness));
    }
}

// ---------------------------------------------------------------------------------------------
// End to end through keygate's ingress.

struct Setup {
    dir: tempfile::TempDir,
    policies: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let policies = dir.path().join("policies");
        allow_all_checkout_policy(&policies);
        Setup { dir, policies }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn secret_ref(&self, name: &str, value: &str) -> String {
        let path = self.path().join(format!("secret-{name}"));
        std::fs::write(&path, value).unwrap();
        format!("file://{}", path.display())
    }

    /// The configuration: audit lake on, endpoint `main`, the given destinations (YAML list items
    /// indented for `destinations:`).
    fn config(&self, ingress: &str, destinations: &str) -> String {
        format!(
            "listen:\n  address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  api: http://127.0.0.1:9\npolicies:\n  dir: {}\n{}webhooks:\n  listen:\n    address: {ingress}\n  state_dir: {}\n  admin_tokens: [\"{}\"]\n  endpoints:\n    - name: main\n      max_body_bytes: 1048576\n      secrets: [\"{}\"]\n      destinations:\n{destinations}",
            self.policies.display(),
            audit_yaml(self.path(), "  roll:\n    max_age: 1s\n"),
            self.path().join("webhook-state").display(),
            self.secret_ref("admin", ADMIN_TOKEN),
            self.secret_ref("signing", SIGNING_SECRET),
        )
    }

    fn start(&self, config: &str) -> (Keygate, SocketAddr) {
        let keygate = Keygate::start(
            self.path(),
            KeygateOptions {
                config: Some(config),
                env: vec![("KG_E2E_STRIPE_KEY".into(), CANARY_KEY.into())],
                args: Vec::new(),
                wait_ready: true,
            },
        );
        let address = ingress_address(&keygate);
        (keygate, address)
    }
}

/// A `kind: sqs` destination on moto.
fn sqs_destination(moto: &Moto, name: &str, queue_url: &str, concurrency: usize, extra: &str) -> String {
    format!(
        "        - name: {name}\n          kind: sqs\n          timeout: 2s\n          retry_for: 120s\n          initial_backoff: 100ms\n          max_backoff: 500ms\n          concurrency: {concurrency}\n          sqs:\n            queue_url: {queue_url}\n            aws:\n              region: {}\n              endpoint_url: {}\n              credentials_file: {}\n{extra}",
        keygate_tests::moto::REGION,
        moto.url(),
        moto.credentials_file().display(),
    )
}

/// A `kind: kafka` destination on tansu: invoices to `stripe.invoices`, the rest to
/// `stripe.events`.
fn kafka_destination(tansu: &Tansu, name: &str, concurrency: usize) -> String {
    format!(
        "        - name: {name}\n          kind: kafka\n          timeout: 2s\n          retry_for: 120s\n          initial_backoff: 100ms\n          max_backoff: 500ms\n          concurrency: {concurrency}\n          kafka:\n            brokers: [\"{}\"]\n            topic: stripe.events\n            routes:\n              - events: [\"invoice.*\"]\n                topic: stripe.invoices\n",
        tansu.bootstrap()
    )
}

/// tansu with the two topics of [`kafka_destination`], three partitions each.
fn tansu_with_topics() -> Tansu {
    let tansu = Tansu::start();
    tansu.create_topic("stripe.invoices", 3);
    tansu.create_topic("stripe.events", 3);
    tansu
}

fn thin_event(id: &str, object: &str) -> String {
    json!({
        "id": id, "object": "v2.core.event", "type": "v1.billing.meter.error_report_triggered",
        "created": "2026-12-01T10:00:00.000Z", "livemode": false, "context": "acct_thin_1",
        "related_object": {"id": object, "type": "billing.meter", "url": format!("/v1/billing/meters/{object}")}
    })
    .to_string()
}

/// An event about `object` (several events per object, to check per-object order).
fn object_event(id: &str, event_type: &str, object: &str) -> String {
    json!({
        "id": id, "object": "event", "type": event_type, "api_version": "2025-03-31.basil",
        "created": 1_764_583_200, "livemode": false, "account": "acct_connected_7",
        "data": {"object": {"id": object, "object": "invoice", "amount_due": 1200, "note": "caf\u{e9} \u{1f600}"}}
    })
    .to_string()
}

fn wait_until<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "{what} within {timeout:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Events posted to the ingress arrive in an SQS standard queue, an SQS FIFO queue and Kafka
/// topics, read back with boto3 and confluent-kafka: bodies byte for byte, attributes and
/// headers, FIFO group and deduplication ids, Kafka keys (one partition per key) and per-object
/// order; a replayed event is deduplicated by the FIFO queue (and delivered again to the standard
/// one); an event over SQS's size limit is dead-lettered at once with the reason.
#[test]
fn events_reach_sqs_standard_and_fifo_queues_and_kafka_topics() {
    let setup = Setup::new();
    let moto = Moto::start();
    let tansu = tansu_with_topics();
    let standard = sqs_create_queue(&moto, "stripe-events");
    let fifo = sqs_create_queue(&moto, "stripe-events.fifo");
    let destinations = [
        sqs_destination(&moto, "sqs-standard", &standard, 20, "            max_message_bytes: 65536\n"),
        // One in flight at a time, as docs/webhooks.md advises for strict per-object order: with
        // more, an event retried after a slow send comes after the object's newer ones.
        sqs_destination(&moto, "sqs-fifo", &fifo, 1, ""),
        // One in flight at a time: events of one object are produced in the order received.
        kafka_destination(&tansu, "kafka", 1),
    ]
    .concat();
    let (keygate, ingress) = setup.start(&setup.config("127.0.0.1:0", &destinations));
    let url = endpoint_url(ingress);

    // Three objects with three events each, interleaved, a thin event and a plain one.
    let mut payloads: Vec<(String, String, String)> = Vec::new(); // (event id, object id, body)
    for step in 0..3 {
        for object in ["in_order_a", "in_order_b", "in_order_c"] {
            let id = format!("evt_brokers_{object}_{step}");
            let event_type = ["invoice.created", "invoice.finalized", "invoice.paid"][step];
            payloads.push((id.clone(), object.into(), object_event(&id, event_type, object)));
        }
    }
    payloads.push(("evt_brokers_thin".into(), "mtr_thin_1".into(), thin_event("evt_brokers_thin", "mtr_thin_1")));
    payloads.push((
        "evt_brokers_charge".into(),
        "obj_evt_brokers_charge".into(),
        event("evt_brokers_charge", "charge.succeeded"),
    ));
    let answers = statuses(&url, payloads.iter().map(|(_, _, body)| signed(body, SIGNING_SECRET)).collect());
    assert!(answers.iter().all(|(status, _)| *status == 200), "{answers:?}");
    let by_id: HashMap<&str, (&str, &str)> =
        payloads.iter().map(|(id, object, body)| (id.as_str(), (object.as_str(), body.as_str()))).collect();

    // A replay of one event to the FIFO queue, while the queue still holds its first delivery:
    // the queue deduplicates it (same Stripe event id within SQS's five-minute window). moto
    // deduplicates only against messages still in the queue (SQS also against deleted ones),
    // hence the replay before the queue is read.
    wait_until(Duration::from_secs(30), "every event delivered to the FIFO queue", || {
        let delivered = metric(
            &keygate.metrics(),
            "keygate_webhook_deliveries_total",
            &["destination=\"sqs-fifo\"", "outcome=\"delivered\""],
        );
        (delivered >= payloads.len() as f64).then_some(())
    });
    replay(&keygate, "sqs-fifo", "evt_brokers_charge");

    // SQS, standard and FIFO: every event once (the FIFO queue without the replayed copy), body
    // byte for byte, attributes.
    for (queue, is_fifo) in [(&standard, false), (&fifo, true)] {
        let mut messages = Vec::new();
        wait_until(Duration::from_secs(30), "every event in the SQS queue", || {
            messages.extend(sqs_read(&moto, queue, Duration::from_millis(300)));
            (messages.len() >= payloads.len()).then_some(())
        });
        assert_eq!(messages.len(), payloads.len(), "{queue}: {messages:?}");
        for message in &messages {
            let attributes = &message["attributes"];
            let id = attributes["stripe-event-id"].as_str().unwrap();
            let (object, body) = by_id[id];
            assert_eq!(message["body"].as_str(), Some(body), "{id}: the body changed");
            assert!(attributes["keygate-event-id"].as_str().is_some_and(|v| v.parse::<uuid::Uuid>().is_ok()));
            assert_eq!(attributes["stripe-livemode"], "false");
            if id == "evt_brokers_thin" {
                assert_eq!(attributes["stripe-event-type"], "v1.billing.meter.error_report_triggered");
                assert_eq!(attributes["stripe-account"], "acct_thin_1");
                assert!(attributes.get("stripe-api-version").is_none_or(Value::is_null));
            } else if id.starts_with("evt_brokers_in_") {
                assert_eq!(attributes["stripe-account"], "acct_connected_7");
                assert_eq!(attributes["stripe-api-version"], "2025-03-31.basil");
            }
            if is_fifo {
                assert_eq!(message["group_id"].as_str(), Some(object), "{id}: FIFO group id");
                assert_eq!(message["dedup_id"].as_str(), Some(id), "{id}: FIFO deduplication id");
            }
        }
        if is_fifo {
            // A FIFO queue hands out each group's messages in the order they were sent.
            for object in ["in_order_a", "in_order_b", "in_order_c"] {
                let order: Vec<&str> = messages
                    .iter()
                    .filter(|m| m["group_id"] == object)
                    .map(|m| m["attributes"]["stripe-event-type"].as_str().unwrap())
                    .collect();
                assert_eq!(order, ["invoice.created", "invoice.finalized", "invoice.paid"], "{object}");
            }
        }
    }

    // Kafka: invoices in stripe.invoices keyed by invoice id, in order per key; the rest in
    // stripe.events; headers; the value byte for byte.
    let invoices = wait_until(Duration::from_secs(30), "every invoice event in stripe.invoices", || {
        let messages = tansu.read("stripe.invoices");
        (messages.len() >= 9).then_some(messages)
    });
    assert_eq!(invoices.len(), 9, "{invoices:?}");
    let mut partitions: HashMap<String, HashSet<u64>> = HashMap::new();
    for object in ["in_order_a", "in_order_b", "in_order_c"] {
        let of_object: Vec<&Value> = invoices.iter().filter(|m| m["key"] == object).collect();
        let types: Vec<&str> = of_object.iter().map(|m| m["headers"]["stripe-event-type"].as_str().unwrap()).collect();
        assert_eq!(types, ["invoice.created", "invoice.finalized", "invoice.paid"], "{object}: per-key order");
        partitions.entry(object.into()).or_default().extend(of_object.iter().map(|m| m["partition"].as_u64().unwrap()));
    }
    assert!(partitions.values().all(|p| p.len() == 1), "one partition per key: {partitions:?}");
    let others = wait_until(Duration::from_secs(30), "the other events in stripe.events", || {
        let messages = tansu.read("stripe.events");
        (messages.len() >= 2).then_some(messages)
    });
    for message in invoices.iter().chain(others.iter()) {
        let headers = &message["headers"];
        let id = headers["stripe-event-id"].as_str().unwrap();
        let (object, body) = by_id[id];
        assert_eq!(message["value"].as_str(), Some(body), "{id}: the value changed");
        assert_eq!(message["key"].as_str(), Some(object), "{id}: the key is the object id");
        assert!(headers["keygate-event-id"].as_str().is_some_and(|v| v.parse::<uuid::Uuid>().is_ok()));
        assert_eq!(headers["keygate-delivery-attempt"], "1");
        assert_eq!(headers["stripe-livemode"], "false");
    }
    assert_eq!(others.len(), 2);

    let deduplicated = sqs_read(&moto, &fifo, Duration::from_secs(1));
    assert!(deduplicated.is_empty(), "the FIFO queue deduplicates the replayed event: {deduplicated:?}");

    // The same replay to the standard queue: it gets the event again, with the same keygate id.
    replay(&keygate, "sqs-standard", "evt_brokers_charge");
    let again = sqs_read(&moto, &standard, Duration::from_secs(1));
    assert_eq!(again.len(), 1, "the standard queue gets the replay: {again:?}");
    assert_eq!(again[0]["attributes"]["stripe-event-id"], "evt_brokers_charge");

    // Over the standard queue's 64 KiB limit: dead-lettered at once, with the reason.
    let big = object_event("evt_brokers_big", "invoice.paid", "in_big").replace("caf", &"x".repeat(70_000));
    let answers = statuses(&url, vec![signed(&big, SIGNING_SECRET)]);
    assert_eq!(answers[0].0, 200);
    let letters = wait_until(Duration::from_secs(20), "the oversized event dead-lettered", || {
        let (status, letters) =
            admin(&keygate, "GET", "/webhooks/dead-letters?destination=sqs-standard", ADMIN_TOKEN, "");
        (status == 200 && letters.to_string().contains("evt_brokers_big")).then_some(letters)
    });
    let text = letters.to_string();
    assert!(text.contains("over the queue's limit of 65536 bytes"), "{text}");
    assert!(text.contains("\"attempts\":1"), "dead-lettered at the first attempt: {text}");
    keygate.signal("TERM");
    let logs = [keygate.stderr.clone(), keygate.stdout.clone()];
    assert_eq!(keygate.wait_exit(Duration::from_secs(30)), Some(0));
    for log in logs.iter().map(|path| std::fs::read_to_string(path).unwrap_or_default()) {
        for secret in [SIGNING_SECRET, ADMIN_TOKEN, CANARY_KEY] {
            assert!(!log.contains(secret), "a secret leaked into keygate's log");
        }
    }
}

/// Replays Stripe event `stripe_event_id` to `destination` (admin API) and waits until the
/// replayed copy was sent.
fn replay(keygate: &Keygate, destination: &str, stripe_event_id: &str) {
    let body = json!({"destination": destination, "stripe_event_id": stripe_event_id}).to_string();
    let (status, answer) = admin(keygate, "POST", "/webhooks/replay", ADMIN_TOKEN, &body);
    assert_eq!(status, 200, "{answer}");
    let label = format!("destination=\"{destination}\"");
    wait_until(Duration::from_secs(20), "the replay sent", || {
        let replayed =
            metric(&keygate.metrics(), "keygate_webhook_deliveries_total", &[&label, "outcome=\"replayed\""]);
        (replayed >= 1.0).then_some(())
    });
}

/// Ids of the events a flood sender acknowledged.
fn acked_ids(out: &Value) -> Vec<String> {
    assert_eq!(out["unacked"].as_array().map(Vec::len), Some(0), "the sender gave up on some: {out}");
    out["acked"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_owned()).collect()
}

/// Every acked id is among `got` (at least once); returns how many extra copies there were.
fn assert_all_arrived(what: &str, acked: &[String], got: &[String]) -> usize {
    let set: HashSet<&String> = got.iter().collect();
    let missing: Vec<&String> = acked.iter().filter(|id| !set.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{what}: {} acknowledged events missing, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    got.len() - set.len()
}

/// The Stripe event ids of every message in the two topics of [`kafka_destination`].
fn kafka_ids(tansu: &Tansu) -> Vec<String> {
    ["stripe.invoices", "stripe.events"]
        .iter()
        .flat_map(|topic| tansu.read(topic))
        .filter_map(|m| m["headers"]["stripe-event-id"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until every acknowledged event is in Kafka; returns how many extra copies there were.
fn wait_all_in_kafka(tansu: &Tansu, acked: &[String]) -> usize {
    let acked_set: HashSet<&String> = acked.iter().collect();
    let kafka = wait_until(Duration::from_secs(60), "every acknowledged event in Kafka", || {
        let ids = kafka_ids(tansu);
        let got: HashSet<&String> = ids.iter().collect();
        acked_set.iter().all(|id| got.contains(*id)).then_some(ids)
    });
    assert_all_arrived("kafka", acked, &kafka)
}

/// Both brokers pause (SIGSTOP) during a stream of events: the ingress keeps acknowledging (the
/// stream, and events posted while they are paused),
/// `/readyz` stays ready but lists both destinations as degraded, and once they resume every
/// event arrives; the duplicates are counted.
#[test]
fn paused_brokers_lose_nothing_and_ingress_keeps_acknowledging() {
    let setup = Setup::new();
    let moto = Moto::start();
    let tansu = tansu_with_topics();
    let queue = sqs_create_queue(&moto, "outage");
    let destinations = [sqs_destination(&moto, "sqs", &queue, 20, ""), kafka_destination(&tansu, "kafka", 8)].concat();
    let (keygate, ingress) = setup.start(&setup.config("127.0.0.1:0", &destinations));
    let url = endpoint_url(ingress);
    let url_paused = url.clone();
    let count = 200;
    let sender = std::thread::spawn(move || {
        node_send(&json!({"url": url, "flood": {
            "count": count, "secret": SIGNING_SECRET, "concurrency": 4, "deadline_ms": 60000,
            "prefix": "evt_outage_", "types": ["invoice.paid", "charge.succeeded"]
        }}))
    });
    std::thread::sleep(Duration::from_millis(200));
    moto.signal("STOP");
    tansu.signal("STOP");
    let paused = Instant::now();
    // While both are paused, the ingress acknowledges new events at once.
    let during: Vec<String> = (0..20).map(|i| format!("evt_paused_{i}")).collect();
    let answers =
        statuses(&url_paused, during.iter().map(|id| signed(&event(id, "invoice.paid"), SIGNING_SECRET)).collect());
    assert!(answers.iter().all(|(status, _)| *status == 200), "the ingress stopped acknowledging: {answers:?}");
    // While both are paused, /readyz is still ready (the ingress takes events) and names them.
    let reasons = wait_until(Duration::from_secs(15), "/readyz lists both paused destinations as degraded", || {
        let response = keygate_tests::http::raw(
            keygate.admin,
            b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n",
        )
        .ok()?;
        (response.status == 200
            && response.body.starts_with("ready, degraded")
            && response.body.contains("`sqs` (sqs)")
            && response.body.contains("`kafka` (kafka)"))
        .then_some(response.body)
    });
    std::thread::sleep(Duration::from_secs(3).saturating_sub(paused.elapsed()));
    moto.signal("CONT");
    tansu.signal("CONT");
    let out = sender.join().unwrap();
    let mut acked = acked_ids(&out);
    assert_eq!(acked.len(), count);
    acked.extend(during);

    let mut sqs_ids: Vec<String> = Vec::new();
    let acked_set: HashSet<&String> = acked.iter().collect();
    wait_until(Duration::from_secs(60), "every acknowledged event in the queue", || {
        sqs_ids.extend(
            sqs_read(&moto, &queue, Duration::from_millis(300))
                .iter()
                .filter_map(|m| m["attributes"]["stripe-event-id"].as_str().map(str::to_owned)),
        );
        let got: HashSet<&String> = sqs_ids.iter().collect();
        acked_set.iter().all(|id| got.contains(*id)).then_some(())
    });
    let sqs_duplicates = assert_all_arrived("sqs", &acked, &sqs_ids);
    let kafka_duplicates = wait_all_in_kafka(&tansu, &acked);
    let metrics = keygate.metrics();
    let errors = metric(&metrics, "keygate_webhook_destination_errors_total", &[]);
    let retries = metric(&metrics, "keygate_webhook_retries_total", &[]);
    println!(
        "outage: {count} events, {} posts; {sqs_duplicates} duplicates in SQS, {kafka_duplicates} in Kafka; {retries} retries; {errors} destination errors; readyz said: {reasons}",
        out["attempts"]
    );
    assert!(errors > 0.0 && retries > 0.0, "the outage shows in the metrics");
    // Once everything is delivered, /readyz no longer lists them.
    wait_until(Duration::from_secs(20), "/readyz plain ready after the brokers resumed", || {
        keygate_tests::http::raw(keygate.admin, b"GET /readyz HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n")
            .ok()
            .filter(|r| r.status == 200 && r.body == "ready\n")
    });
}

/// SIGKILL at random moments while a sender posts hundreds of events and retries like Stripe:
/// every acknowledged event is in the SQS queue and in Kafka at least once.
#[test]
fn kill_9_rounds_with_kafka_and_sqs_destinations_lose_no_acknowledged_event() {
    let setup = Setup::new();
    let moto = Moto::start();
    let tansu = tansu_with_topics();
    let queue = sqs_create_queue(&moto, "crash");
    let destinations = [sqs_destination(&moto, "sqs", &queue, 20, ""), kafka_destination(&tansu, "kafka", 8)].concat();
    // A fixed port: the sender keeps posting to it across restarts.
    let ingress = format!("127.0.0.1:{}", keygate_tests::free_port());
    let config = setup.config(&ingress, &destinations);
    let (keygate, _) = setup.start(&config);
    let url = format!("http://{ingress}/webhooks/stripe/main");
    let count = 300;
    let mut keygate = Some(keygate);
    let (out, rounds) = flood_through_kill_rounds(url, count, SIGNING_SECRET, 5, setup.path(), || {
        if let Some(running) = keygate.take() {
            running.signal("KILL");
            let _ = running.wait_exit(Duration::from_secs(10));
        }
        keygate = Some(setup.start(&config).0);
    });
    let acked = acked_ids(&out);
    let acked_set: HashSet<&String> = acked.iter().collect();
    let mut sqs_ids: Vec<String> = Vec::new();
    wait_until(Duration::from_secs(60), "every acknowledged event in the queue", || {
        sqs_ids.extend(
            sqs_read(&moto, &queue, Duration::from_millis(300))
                .iter()
                .filter_map(|m| m["attributes"]["stripe-event-id"].as_str().map(str::to_owned)),
        );
        let got: HashSet<&String> = sqs_ids.iter().collect();
        acked_set.iter().all(|id| got.contains(*id)).then_some(())
    });
    let sqs_duplicates = assert_all_arrived("sqs", &acked, &sqs_ids);
    let kafka_duplicates = wait_all_in_kafka(&tansu, &acked);
    println!(
        "{rounds} kills; {} posts for {} events; {sqs_duplicates} redeliveries to SQS, {kafka_duplicates} to Kafka",
        out["attempts"],
        acked.len()
    );
    let keygate = keygate.unwrap();
    keygate.signal("TERM");
    assert_eq!(keygate.wait_exit(Duration::from_secs(60)), Some(0));
}

/// The `le` bound of the histogram bucket holding the `q` quantile of metric `name` with `label`.
fn histogram_quantile(metrics: &str, name: &str, label: &str, q: f64) -> f64 {
    let buckets: Vec<(f64, f64)> = metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")) && l.contains(label))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    let total = buckets.iter().map(|(_, n)| *n).fold(0.0, f64::max);
    buckets.iter().find(|(_, n)| *n >= q * total).map(|(le, _)| *le).unwrap_or(f64::NAN)
}

/// Benchmark (not a timed test; run by hand, results in docs/benchmarks.md): events per second
/// from the ingress to each broker and the p99 from receipt to the broker's acknowledgement.
/// `cargo test -p keygate-tests --test webhooks_brokers --no-run`, then
/// `<binary> --ignored --nocapture broker_throughput` (`KEYGATE_BENCH_EVENTS`, default 2000;
/// `KEYGATE_BENCH_BROKERS`, comma-separated, default all).
#[test]
#[ignore = "benchmark, run by hand (docs/benchmarks.md)"]
fn broker_throughput() {
    let count: usize = std::env::var("KEYGATE_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(2000);
    let kinds = std::env::var("KEYGATE_BENCH_BROKERS").unwrap_or_else(|_| "kafka,sqs".into());
    for kind in kinds.split(',') {
        assert!(matches!(kind, "kafka" | "sqs"), "KEYGATE_BENCH_BROKERS names the brokers to measure: kafka, sqs");
        let setup = Setup::new();
        let moto = Moto::start();
        let queue = sqs_create_queue(&moto, "bench");
        let tansu = tansu_with_topics();
        let destination = if kind == "kafka" {
            kafka_destination(&tansu, "bench", 64)
        } else {
            sqs_destination(&moto, "bench", &queue, 20, "")
        };
        let (keygate, ingress) = setup.start(&setup.config("127.0.0.1:0", &destination));
        let url = endpoint_url(ingress);
        let started = Instant::now();
        let out = node_send(&json!({"url": url, "flood": {
            "count": count, "secret": SIGNING_SECRET, "concurrency": 32, "deadline_ms": 300000,
            "prefix": "evt_bench_", "types": ["invoice.paid", "charge.succeeded"]
        }}));
        let acked = started.elapsed();
        assert_eq!(acked_ids(&out).len(), count);
        wait_until(Duration::from_secs(300), "every event delivered", || {
            (metric(&keygate.metrics(), "keygate_webhook_deliveries_total", &["outcome=\"delivered\""]) >= count as f64)
                .then_some(())
        });
        let delivered = started.elapsed();
        let metrics = keygate.metrics();
        let p50 = histogram_quantile(&metrics, "keygate_webhook_delivery_latency_seconds", "bench", 0.5);
        let p99 = histogram_quantile(&metrics, "keygate_webhook_delivery_latency_seconds", "bench", 0.99);
        let ack_p99 = histogram_quantile(&metrics, "keygate_webhook_ack_duration_seconds", "", 0.99);
        println!(
            "{kind}: {count} events acknowledged in {:.1} s ({:.0}/s), all at the broker after {:.1} s ({:.0}/s); receipt to broker ack p50 <= {p50} s, p99 <= {p99} s; ingress ack p99 <= {ack_p99} s",
            acked.as_secs_f64(),
            count as f64 / acked.as_secs_f64(),
            delivered.as_secs_f64(),
            count as f64 / delivered.as_secs_f64()
        );
    }
}
