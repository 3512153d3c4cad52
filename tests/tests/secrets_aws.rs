//! keygate-secrets against a real moto_server speaking the AWS Secrets Manager API: plain and
//! JSON secrets, ARNs, version stages and ids, rotation, outage and recovery, bad input.
//! Canary values must never reach logs, metrics or errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod secrets_common;

use std::time::{Duration, Instant};

use keygate_secrets::{AwsConfig, SecretStore, SecretsConfig};
use keygate_tests::moto::{Moto, REGION};
use secrets_common::*;

fn aws_config(moto: &Moto) -> SecretsConfig {
    SecretsConfig {
        aws: AwsConfig {
            region: Some(REGION.to_owned()),
            endpoint_url: Some(moto.url()),
            profile: None,
            credentials_file: Some(moto.credentials_file()),
        },
        ..SecretsConfig::default()
    }
}

#[tokio::test]
async fn plain_and_json_secrets_by_name_arn_stage_and_version() {
    let logs = LogCapture::start();
    let canary = "sk_live_canaryAws0001";
    let canary_json_1 = "rk_live_canaryAwsJson0001";
    let canary_json_2 = "rk_live_canaryAwsJson0002";
    let moto = Moto::start();
    let plain_version = moto.create_secret("keygate/plain", canary);
    let v1 = moto.create_secret(
        "keygate/stripe",
        &serde_json::json!({"api_key": canary_json_1, "account": "acct_1"}).to_string(),
    );
    let v2 = moto.put_secret_value("keygate/stripe", &serde_json::json!({"api_key": canary_json_2}).to_string());
    let store = SecretStore::new(&aws_config(&moto)).await.unwrap();

    let plain = store.get(&reference("aws-sm://keygate/plain")).await.unwrap();
    assert_eq!(plain.value.expose(), canary);
    assert_eq!(plain.version.as_deref(), Some(plain_version.as_str()));

    let current = store.get(&reference("aws-sm://keygate/stripe#api_key")).await.unwrap();
    assert_eq!(current.value.expose(), canary_json_2);
    assert_eq!(current.version.as_deref(), Some(v2.as_str()));

    let previous = store.get(&reference("aws-sm://keygate/stripe#api_key?stage=AWSPREVIOUS")).await.unwrap();
    assert_eq!(previous.value.expose(), canary_json_1);
    assert_eq!(previous.version.as_deref(), Some(v1.as_str()));

    let pinned = store.get(&reference(&format!("aws-sm://keygate/stripe?version={v1}#account"))).await.unwrap();
    assert_eq!(pinned.value.expose(), "acct_1");

    let arn = moto.secret_arn("keygate/plain");
    let by_arn = store.get(&reference(&format!("aws-sm://{arn}"))).await.unwrap();
    assert_eq!(by_arn.value.expose(), canary);

    let metrics = metrics_text(&store);
    assert!(metrics.contains(r#"keygate_secret_refreshes_total{source="aws-sm",result="success"} 5"#), "{metrics}");
    assert_no_canary(
        &[canary, canary_json_1, canary_json_2],
        &[("logs", &logs.text()), ("metrics", &metrics), ("debug", &format!("{current:?} {store:?}"))],
    );
}

#[tokio::test]
async fn a_new_version_is_picked_up_within_the_ttl() {
    let logs = LogCapture::start();
    let moto = Moto::start();
    moto.create_secret("keygate/rotating", "sk_test_aws_rotation_1");
    let mut config = aws_config(&moto);
    cache_config(&mut config, 1_000, 60_000);
    let store = SecretStore::new(&config).await.unwrap();
    let r = reference("aws-sm://keygate/rotating");
    assert_eq!(store.get(&r).await.unwrap().value.expose(), "sk_test_aws_rotation_1");

    let new_version = moto.put_secret_value("keygate/rotating", "sk_test_aws_rotation_2");
    let written = Instant::now();
    let rotated =
        eventually(&store, &r, "rotation", |o| value_of(o).as_deref() == Some("sk_test_aws_rotation_2")).await.unwrap();
    assert_eq!(rotated.version.as_deref(), Some(new_version.as_str()));
    assert!(written.elapsed() < Duration::from_millis(1_000) + config.cache.fetch_timeout);
    assert!(logs.text().contains("secret rotated"));
}

#[tokio::test]
async fn an_outage_serves_from_cache_until_max_stale_then_fails_closed_and_recovers_by_itself() {
    let logs = LogCapture::start();
    let canary = "sk_live_canaryAwsOutage0001";
    let mut moto = Moto::start();
    moto.create_secret("keygate/outage", canary);
    let mut config = aws_config(&moto);
    cache_config(&mut config, 500, 4_000);
    let store = SecretStore::new(&config).await.unwrap();
    let r = reference("aws-sm://keygate/outage");
    store.preload(std::slice::from_ref(&r)).await.unwrap();

    moto.stop();
    let stopped = Instant::now();
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stale = store.get(&r).await;
    assert_eq!(value_of(&stale).as_deref(), Some(canary), "{stale:?}");
    let error = eventually(&store, &r, "fail closed", Result::is_err).await.unwrap_err();
    assert!(stopped.elapsed() >= Duration::from_secs(4), "failed closed before max_stale had passed");
    assert!(error.is_unavailable(), "{error}");
    let message = error.to_string();
    eprintln!("fail-closed error: {message}");
    assert!(message.contains("aws-sm://keygate/outage"), "{message}");
    assert!(message.contains("AWS Secrets Manager is unavailable"), "{message}");

    moto.restart();
    moto.create_secret("keygate/outage", "sk_live_canaryAwsOutage0002");
    let back = eventually(&store, &r, "recovery", Result::is_ok).await.unwrap();
    assert_eq!(back.value.expose(), "sk_live_canaryAwsOutage0002");
    let metrics = metrics_text(&store);
    assert!(metrics.contains(r#"keygate_secret_refreshes_total{source="aws-sm",result="failure"}"#), "{metrics}");
    assert_no_canary(
        &[canary, "sk_live_canaryAwsOutage0002"],
        &[("logs", &logs.text()), ("metrics", &metrics), ("error", &error_texts(&error))],
    );
}

#[tokio::test]
async fn bad_input_fails_with_an_error_naming_what_is_wrong() {
    let logs = LogCapture::start();
    let canary = "sk_live_canaryAwsBad0001";
    let moto = Moto::start();
    moto.create_secret("keygate/json", &serde_json::json!({"api_key": canary, "n": 1}).to_string());
    moto.create_secret("keygate/not-json", canary);
    moto.create_secret("keygate/blank", "   ");
    moto.create_secret_binary("keygate/binary", &[0xff, 0xfe, 0x00, 0x9f]);
    moto.create_secret_binary("keygate/binary-text", canary.as_bytes());
    let store = SecretStore::new(&aws_config(&moto)).await.unwrap();

    let cases: &[(&str, &str, &[&str])] = &[
        (
            "aws-sm://keygate/absent",
            "not_found",
            &["aws-sm://keygate/absent", "was not found", "ResourceNotFoundException"],
        ),
        ("aws-sm://keygate/json#apikey", "missing_field", &["no field `apikey`", "api_key, n"]),
        ("aws-sm://keygate/json#n", "bad_value", &["field `n` holds a JSON number"]),
        ("aws-sm://keygate/not-json#api_key", "bad_value", &["not a JSON object", "drop `#api_key`"]),
        ("aws-sm://keygate/blank", "empty", &["aws-sm://keygate/blank", "is empty"]),
        ("aws-sm://keygate/binary", "not_utf8", &["aws-sm://keygate/binary", "not valid UTF-8"]),
        ("aws-sm://keygate/binary-text#api_key", "bad_value", &["binary", "no JSON field `api_key`"]),
        ("aws-sm://keygate/json?version=00000000-0000-0000-0000-000000000000", "not_found", &["was not found"]),
        ("aws-sm://keygate/json?stage=AWSPENDING", "not_found", &["was not found"]),
    ];
    let mut texts = Vec::new();
    for (text, kind, says) in cases {
        let error = store.get(&reference(text)).await.unwrap_err();
        assert_eq!(error.kind(), *kind, "{text}: {error}");
        let message = error.to_string();
        eprintln!("{text}: {message}");
        for part in *says {
            assert!(message.contains(part), "{text}: `{message}` should say {part:?}");
        }
        assert!(!error.is_unavailable(), "{text}: misconfiguration is not an outage: {error}");
        texts.push(error_texts(&error));
    }
    // A binary secret holding UTF-8 text is usable as a whole.
    assert_eq!(store.get(&reference("aws-sm://keygate/binary-text")).await.unwrap().value.expose(), canary);

    let log_text = logs.text();
    let mut scanned: Vec<(&str, &str)> = texts.iter().map(|t| ("error", t.as_str())).collect();
    scanned.push(("logs", &log_text));
    assert_no_canary(&[canary], &scanned);
}
