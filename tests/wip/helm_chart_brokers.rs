// To append to tests/tests/helm_chart.rs with webhooks/wip/helm.patch.
/// Kafka and SQS webhook destinations (docs/webhooks.md#kafka-and-sqs-destinations): the schema
/// takes them with their credentials as secret references (a SASL password from a Kubernetes
/// Secret mounted with extraVolumes, read through `file://`; SQS through the pod's IRSA role),
/// they reach the rendered configuration as written, and misplaced or literal settings are refused.
#[test]
fn broker_destinations_take_credentials_by_reference_and_reach_the_config() {
    let kafka = json!({
        "name": "ledger", "kind": "kafka", "concurrency": 1,
        "kafka": {
            "brokers": ["kafka-1.kafka.svc:9093"], "topic": "stripe.events",
            "routes": [{"events": ["invoice.*"], "topic": "stripe.invoices"}],
            "security_protocol": "sasl_ssl",
            "sasl": {"mechanism": "SCRAM-SHA-512", "username": "keygate", "password": "file:///etc/keygate/kafka/password"}
        },
        "ca_file": "/etc/keygate/kafka/ca.crt"
    });
    let sqs = json!({
        "name": "fulfilment", "kind": "sqs",
        "sqs": {"queue_url": "https://sqs.eu-west-1.amazonaws.com/123456789012/stripe.fifo", "aws": {"region": "eu-west-1"}}
    });
    let with = |destinations: Value| {
        json!({
            "webhooks": {"enabled": true},
            "serviceAccount": {"awsRoleArn": "arn:aws:iam::123456789012:role/keygate-webhooks"},
            "extraVolumes": [{"name": "kafka-client", "secret": {"secretName": "kafka-keygate"}}],
            "extraVolumeMounts": [{"name": "kafka-client", "mountPath": "/etc/keygate/kafka", "readOnly": true}],
            "config": {"webhooks": {"endpoints": [{"name": "payments", "secrets": ["env://WHSEC"], "destinations": destinations}]}}
        })
    };
    let values = with(json!([kafka, sqs]));
    let (accepted, message) = schema_check(&values);
    assert!(accepted, "the schema refuses broker destinations:\n{message}");
    let rendered = render_with(&values);
    let destinations = &rendered.config()["webhooks"]["endpoints"][0]["destinations"];
    assert_eq!(destinations[0], kafka);
    assert_eq!(destinations[1], sqs);
    assert_eq!(rendered.mount_path("kafka-client"), "/etc/keygate/kafka");

    let mut literal = kafka.clone();
    literal["kafka"]["sasl"]["password"] = json!("hunter2-literal-password");
    let mut kafka_with_url = kafka.clone();
    kafka_with_url["url"] = json!("https://b/h");
    let mut sqs_typo = sqs.clone();
    sqs_typo["sqs"]["queue_ur"] = json!("x");
    for bad in [
        json!([literal]),
        json!([kafka_with_url]),
        json!([{"name": "k", "kind": "kafka"}]),
        json!([{"name": "n", "kind": "nats", "url": "https://b/h", "secret": "env://B"}]),
        json!([sqs_typo]),
        json!([{"name": "h", "url": "https://b/h"}]),
    ] {
        assert!(!schema_check(&with(bad.clone())).0, "accepted {bad}");
    }
}
