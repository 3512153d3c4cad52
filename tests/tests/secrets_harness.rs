//! The OpenBao and moto harnesses do what the other secrets tests rely on: they start, seed,
//! stop and restart real servers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keygate_tests::moto::Moto;
use keygate_tests::openbao::OpenBao;

#[test]
fn openbao_seeds_kv_policies_approle_and_transit_and_restarts_empty() {
    let mut bao = OpenBao::start();
    assert_eq!(bao.kv_put_fields("secret", "harness/stripe", &[("api_key", "sk_test_harness_1")]), 1);
    assert_eq!(bao.kv_put_fields("secret", "harness/stripe", &[("api_key", "sk_test_harness_2")]), 2);
    let read = bao.bao_json(&["kv", "get", "-mount=secret", "harness/stripe"]);
    assert_eq!(read["data"]["data"]["api_key"], "sk_test_harness_2");

    bao.write_policy("harness-read", r#"path "secret/data/harness/*" { capabilities = ["read"] }"#);
    let token = bao.create_token(&["harness-read"], "1h", true);
    let ttl = bao.token_ttl(&token);
    assert!(ttl > 3000 && ttl <= 3600, "a 1h token has about an hour left, got {ttl}s");

    let (role_id, secret_id) = bao.approle("approle", "harness", &["harness-read"], "10m");
    assert!(!role_id.is_empty() && !secret_id.is_empty());
    let login = bao.bao_json(&[
        "write",
        "auth/approle/login",
        &format!("role_id={role_id}"),
        &format!("secret_id={secret_id}"),
    ]);
    assert_eq!(login["auth"]["token_policies"], serde_json::json!(["default", "harness-read"]));

    bao.transit_key("transit", "harness");
    let encrypted = bao.bao_json(&["write", "transit/encrypt/harness", "plaintext=aGVsbG8="]);
    assert!(encrypted["data"]["ciphertext"].as_str().unwrap().starts_with("vault:v1:"));

    bao.restart();
    let after = bao.try_bao(&["kv", "get", "-mount=secret", "harness/stripe"]);
    assert!(after.as_ref().is_err_and(|e| e.contains("No value found")), "a restarted dev server is empty: {after:?}");
}

#[test]
fn moto_seeds_secrets_versions_and_buckets_and_restarts_empty() {
    let mut moto = Moto::start();
    let first = moto.create_secret("harness/stripe", "sk_test_moto_1");
    let second = moto.put_secret_value("harness/stripe", "sk_test_moto_2");
    assert_ne!(first, second);
    let current = moto.call("secretsmanager", "get_secret_value", serde_json::json!({"SecretId": "harness/stripe"}));
    assert_eq!(current["SecretString"], "sk_test_moto_2");
    let previous = moto.call(
        "secretsmanager",
        "get_secret_value",
        serde_json::json!({"SecretId": "harness/stripe", "VersionStage": "AWSPREVIOUS"}),
    );
    assert_eq!(previous["VersionId"], first.as_str());
    assert!(moto.secret_arn("harness/stripe").starts_with("arn:aws:secretsmanager:us-east-1:"));
    moto.create_secret_binary("harness/binary", &[0xff, 0xfe, 0x00]);
    moto.create_bucket("harness-bucket");
    let buckets = moto.call("s3", "list_buckets", serde_json::json!({}));
    assert_eq!(buckets["Buckets"][0]["Name"], "harness-bucket");
    assert!(std::fs::read_to_string(moto.credentials_file()).unwrap().contains("[default]"));

    moto.restart();
    let listed = moto.call("secretsmanager", "list_secrets", serde_json::json!({}));
    assert_eq!(listed["SecretList"], serde_json::json!([]), "a restarted moto is empty");
}
