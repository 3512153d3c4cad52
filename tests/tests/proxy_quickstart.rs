//! The quick start (`keygate serve` with no configuration) and `keygate config check`.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::process::Command;
use std::time::Duration;

use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::request;
use keygate_tests::keygate::{Keygate, KeygateOptions, keygate_bin};
use keygate_tests::proxy_setup::CANARY_KEY;

fn quickstart_env(key: Option<&str>, upstream: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("KEYGATE_LISTEN__ADDRESS".to_owned(), "127.0.0.1:0".to_owned()),
        ("KEYGATE_ADMIN__ADDRESS".to_owned(), "127.0.0.1:0".to_owned()),
        ("KEYGATE_UPSTREAMS__API".to_owned(), upstream.to_owned()),
    ];
    if let Some(key) = key {
        env.push(("STRIPE_SECRET_KEY".to_owned(), key.to_owned()));
    }
    env
}

fn run_serve_expecting_failure(dir: &std::path::Path, env: &[(String, String)], args: &[&str]) -> (i32, String) {
    let output = Command::new(keygate_bin())
        .current_dir(dir)
        .arg("serve")
        .args(args)
        .env_remove("STRIPE_SECRET_KEY")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .output()
        .expect("run keygate");
    (output.status.code().unwrap_or(-1), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quickstart_prints_a_token_that_works_and_keeps_it_across_restarts() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let env = quickstart_env(Some(CANARY_KEY), &fake.url());
    let keygate =
        Keygate::start(dir.path(), KeygateOptions { config: None, env: env.clone(), args: vec![], wait_ready: true });

    let token_file = dir.path().join("keygate-data/service-token");
    let token = std::fs::read_to_string(&token_file).expect("token file").trim().to_owned();
    assert!(token.starts_with("sk_kg_"), "{token}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&token_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "the token file must be private");
    }
    let banner = keygate.stdout_text();
    assert!(banner.contains(&token), "the banner shows the token: {banner}");
    assert!(banner.contains("ALLOWS EVERY STRIPE OPERATION"), "{banner}");
    assert!(banner.contains("stripe.StripeClient("), "the Python line: {banner}");
    assert!(banner.contains("new Stripe("), "the Node line: {banner}");
    assert!(!banner.contains(CANARY_KEY), "the Stripe key must not be printed");
    assert!(keygate.stderr_text().contains("allows every Stripe operation"), "the log says so too");

    let addr = keygate.proxy;
    let token_clone = token.clone();
    let response = tokio::task::spawn_blocking(move || request(addr, "GET", "/v1/customers", &token_clone, &[], ""))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(fake.received()[0].header("authorization"), Some(format!("Bearer {CANARY_KEY}").as_str()));
    assert!(!keygate.stderr_text().contains(CANARY_KEY));
    assert!(!keygate.stderr_text().contains(&token), "the token is in the banner, never in the log");
    keygate.signal("TERM");
    assert_eq!(keygate.wait_exit(Duration::from_secs(10)), Some(0));

    // A restart keeps the token the developer already pasted.
    let again = Keygate::start(dir.path(), KeygateOptions { config: None, env, args: vec![], wait_ready: true });
    assert_eq!(std::fs::read_to_string(&token_file).unwrap().trim(), token);
    assert!(again.stdout_text().contains(&token));
}

#[test]
fn quickstart_without_a_key_says_what_to_set() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stderr) = run_serve_expecting_failure(dir.path(), &quickstart_env(None, "http://127.0.0.1:9"), &[]);
    assert_eq!(code, 2);
    assert!(stderr.contains("STRIPE_SECRET_KEY is not set"), "{stderr}");
    assert!(stderr.contains("export STRIPE_SECRET_KEY=sk_test_"), "{stderr}");
}

#[test]
fn quickstart_refuses_a_live_key_unless_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    for live in ["sk_live_CANARYlive000000", "rk_live_CANARYlive000000"] {
        let (code, stderr) =
            run_serve_expecting_failure(dir.path(), &quickstart_env(Some(live), "http://127.0.0.1:9"), &[]);
        assert_eq!(code, 2, "{stderr}");
        assert!(stderr.contains("live-mode key"), "{stderr}");
        assert!(stderr.contains("--allow-live-key"), "{stderr}");
        assert!(!stderr.contains("CANARYlive"), "the key must not be echoed: {stderr}");
    }
    let keygate = Keygate::start(
        dir.path(),
        KeygateOptions {
            config: None,
            env: quickstart_env(Some("sk_live_CANARYlive000000"), "http://127.0.0.1:9"),
            args: vec!["--allow-live-key".into()],
            wait_ready: true,
        },
    );
    assert!(keygate.stdout_text().contains("LIVE mode"));
}

#[test]
fn token_new_prints_a_token_and_its_policy_hash() {
    let output = Command::new(keygate_bin()).args(["token", "new", "--service", "checkout"]).output().unwrap();
    assert!(output.status.success());
    let text = String::from_utf8_lossy(&output.stdout);
    let token = text.lines().find_map(|l| l.strip_prefix("token: ")).expect("token line").trim();
    let hash = text.lines().find_map(|l| l.strip_prefix("hash:  ")).expect("hash line").trim();
    assert!(token.starts_with("sk_kg_"));
    assert_eq!(keygate::auth::token_hash(token), hash);
}

#[test]
fn config_check_lists_every_problem_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keygate.yaml");
    std::fs::write(&path, "listen:\n  adress: 0.0.0.0:1\nupstreams:\n  api: ftp://nope\nlimits:\n  max_headers: 0\n")
        .unwrap();
    let output = Command::new(keygate_bin())
        .arg("config")
        .arg("check")
        .arg(&path)
        .env("KEYGATE_LOG__LEVEL", "not a level [")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "unknown key `listen.adress`",
        "`upstreams.api`: the scheme must be http or https",
        "`limits.max_headers` must be at least 1",
        "`policies.dir` is required",
        "`log.level`",
    ] {
        assert!(stderr.contains(expected), "missing {expected:?} in {stderr}");
    }
}
