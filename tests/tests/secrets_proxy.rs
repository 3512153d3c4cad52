//! Secret sources through the proxy, against real servers (OpenBao, moto): rotation under load
//! and outages. The fake upstream accepts only the current key, as Stripe does after a roll.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::{RawResponse, request};
use keygate_tests::moto::Moto;
use keygate_tests::openbao::OpenBao;
use keygate_tests::proxy_setup::{ProxySetup, SetupOptions};

const KEY_V1: &str = "sk_test_51ROTATIONcanaryVersionOne000000000000000000";
const KEY_V2: &str = "sk_test_51ROTATIONcanaryVersionTwo000000000000000000";
const TTL_SECS: u64 = 2;

/// Sends GET /v1/customers in a loop until stopped; returns (when sent, response) pairs.
fn steady_stream(
    addr: std::net::SocketAddr,
    token: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(Instant, RawResponse)>> {
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let sent = Instant::now();
            let response = request(addr, "GET", "/v1/customers", &token, &[], "").expect("response");
            seen.push((sent, response));
            std::thread::sleep(Duration::from_millis(20));
        }
        seen
    })
}

/// Runs the rotation scenario: stream → rotate the key in the source and at the upstream at the
/// same moment → stream on for more than one TTL.
async fn rotate_under_load(setup: &ProxySetup, fake: &FakeStripe, rotate: impl FnOnce()) {
    let stop = Arc::new(AtomicBool::new(false));
    let stream = steady_stream(setup.keygate.proxy, setup.token.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    // As at Stripe: the new key works before keygate's source has it, then the old one stops
    // working. Without the first step, a background refresh landing between the write to the
    // source and the upstream's switch would send the new key to an upstream that refuses it.
    fake.set_behavior(Behavior::AnyKeyOf(vec![KEY_V1.to_owned(), KEY_V2.to_owned()]));
    let rotated_at = Instant::now();
    rotate();
    fake.set_behavior(Behavior::OnlyKey(KEY_V2.to_owned()));
    tokio::time::sleep(Duration::from_secs(TTL_SECS * 2 + 1)).await;
    stop.store(true, Ordering::SeqCst);
    let seen = tokio::task::spawn_blocking(move || stream.join().unwrap()).await.unwrap();

    assert!(seen.len() > 50, "the stream was not steady: {} requests", seen.len());
    let after_ttl: Vec<_> =
        seen.iter().filter(|(sent, _)| *sent > rotated_at + Duration::from_secs(TTL_SECS)).collect();
    assert!(!after_ttl.is_empty());
    let refused: Vec<_> =
        after_ttl.iter().filter(|(_, r)| r.status != 200).map(|(_, r)| (r.status, r.body.clone())).collect();
    assert!(refused.is_empty(), "requests refused after one TTL: {refused:?}");
    // Thanks to the refresh-and-retry on 401, GETs are not refused even within the TTL.
    let unauthorized = seen.iter().filter(|(_, r)| r.status == 401).count();
    assert_eq!(unauthorized, 0, "a GET got Stripe's 401 although keygate could retry it with the new key");
    let last = fake.received().pop().expect("upstream saw requests");
    assert_eq!(last.header("authorization"), Some(format!("Bearer {KEY_V2}").as_str()));
    setup.assert_no_secret_leaked();
    for key in [KEY_V1, KEY_V2] {
        assert!(!setup.keygate.stderr_text().contains(key));
        assert!(!setup.keygate.metrics().contains(key));
    }
}

fn vault_options(bao: &OpenBao, upstream: &str, ttl: &str, max_stale: &str) -> SetupOptions {
    let mut options = SetupOptions::new(upstream);
    options.stripe_key = "vault://secret/stripe/checkout#key".into();
    options.extra_config = format!(
        "secrets:\n  vault:\n    address: {}\n    auth:\n      method: token\n      token: env://KG_E2E_VAULT_TOKEN\n  cache:\n    ttl: {ttl}\n    max_stale: {max_stale}\n    refresh_ahead: 500ms\n    backoff_initial: 200ms\n    backoff_max: 1s\n    fetch_timeout: 2s\n",
        bao.url()
    );
    options.env.push(("KG_E2E_VAULT_TOKEN".into(), bao.root_token.clone()));
    options
}

fn aws_options(moto: &Moto, upstream: &str, ttl: &str, max_stale: &str) -> SetupOptions {
    let mut options = SetupOptions::new(upstream);
    options.stripe_key = "aws-sm://stripe/checkout#key".into();
    options.extra_config = format!(
        "secrets:\n  aws:\n    region: us-east-1\n    endpoint_url: {}\n  cache:\n    ttl: {ttl}\n    max_stale: {max_stale}\n    refresh_ahead: 500ms\n    backoff_initial: 200ms\n    backoff_max: 1s\n    fetch_timeout: 2s\n",
        moto.url()
    );
    options.env.extend(moto.env().into_iter().map(|(k, v)| (k.to_owned(), v)));
    options
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_in_openbao_is_picked_up_under_load() {
    let bao = OpenBao::start();
    bao.kv_put_fields("secret", "stripe/checkout", &[("key", KEY_V1)]);
    let fake = FakeStripe::start(Behavior::OnlyKey(KEY_V1.to_owned())).await;
    let setup = ProxySetup::start(vault_options(&bao, &fake.url(), &format!("{TTL_SECS}s"), "1h"));
    rotate_under_load(&setup, &fake, || {
        bao.kv_put_fields("secret", "stripe/checkout", &[("key", KEY_V2)]);
    })
    .await;
    assert!(!bao.log_text().contains(&setup.token));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotated_in_aws_secrets_manager_is_picked_up_under_load() {
    let moto = Moto::start();
    moto.create_secret("stripe/checkout", &serde_json::json!({ "key": KEY_V1 }).to_string());
    let fake = FakeStripe::start(Behavior::OnlyKey(KEY_V1.to_owned())).await;
    let setup = ProxySetup::start(aws_options(&moto, &fake.url(), &format!("{TTL_SECS}s"), "1h"));
    rotate_under_load(&setup, &fake, || {
        moto.put_secret_value("stripe/checkout", &serde_json::json!({ "key": KEY_V2 }).to_string());
    })
    .await;
}

/// Requests until one is refused; returns the refusal and how long it took.
async fn until_refused(setup: &ProxySetup, limit: Duration) -> (RawResponse, Duration) {
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        while started.elapsed() < limit {
            let response = request(addr, "GET", "/v1/customers", &token, &[], "").unwrap();
            if response.status != 200 {
                return (response, started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("no request was refused within {limit:?}");
    })
    .await
    .unwrap()
}

async fn until_served(setup: &ProxySetup, limit: Duration) {
    let addr = setup.keygate.proxy;
    let token = setup.token.clone();
    tokio::task::spawn_blocking(move || {
        let started = Instant::now();
        while started.elapsed() < limit {
            if request(addr, "GET", "/v1/customers", &token, &[], "").unwrap().status == 200 {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("keygate did not recover within {limit:?}");
    })
    .await
    .unwrap();
}

fn assert_secret_unavailable(response: &RawResponse, reference: &str) {
    assert_eq!(response.status, 503, "{response:?}");
    let json = response.json();
    assert_eq!(json["error"]["code"], "keygate_secret_unavailable");
    assert!(json["error"]["message"].as_str().unwrap().contains(reference), "{json}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openbao_outage_is_served_from_cache_until_max_stale_then_fails_closed_and_recovers() {
    let mut bao = OpenBao::start();
    bao.kv_put_fields("secret", "stripe/checkout", &[("key", KEY_V1)]);
    let fake = FakeStripe::start(Behavior::OnlyKey(KEY_V1.to_owned())).await;
    let setup = ProxySetup::start(vault_options(&bao, &fake.url(), "1s", "3s"));
    bao.stop();
    let forwarded_before = fake.received().len();
    let (refusal, after) = until_refused(&setup, Duration::from_secs(20)).await;
    assert!(
        after >= Duration::from_secs(2),
        "the cache should serve through the outage for a while, refused after {after:?}"
    );
    assert_secret_unavailable(&refusal, "vault://secret/stripe/checkout#key");
    assert!(fake.received().len() > forwarded_before, "requests went on from cache during the outage");
    let forwarded = fake.received().len();
    let (again, _) = until_refused(&setup, Duration::from_secs(2)).await;
    assert_eq!(again.status, 503);
    assert_eq!(fake.received().len(), forwarded, "nothing is forwarded without a key");

    // The server comes back (a fresh dev server: the secret is written again); no restart of keygate.
    bao.restart();
    bao.kv_put_fields("secret", "stripe/checkout", &[("key", KEY_V1)]);
    until_served(&setup, Duration::from_secs(20)).await;
    setup.assert_no_secret_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_moto_outage_is_served_from_cache_until_max_stale_then_fails_closed_and_recovers() {
    let mut moto = Moto::start();
    moto.create_secret("stripe/checkout", &serde_json::json!({ "key": KEY_V1 }).to_string());
    let fake = FakeStripe::start(Behavior::OnlyKey(KEY_V1.to_owned())).await;
    let setup = ProxySetup::start(aws_options(&moto, &fake.url(), "1s", "3s"));
    moto.stop();
    let (refusal, after) = until_refused(&setup, Duration::from_secs(30)).await;
    assert!(after >= Duration::from_secs(2), "refused after {after:?}");
    assert_secret_unavailable(&refusal, "aws-sm://stripe/checkout#key");
    moto.restart();
    moto.create_secret("stripe/checkout", &serde_json::json!({ "key": KEY_V1 }).to_string());
    until_served(&setup, Duration::from_secs(30)).await;
    setup.assert_no_secret_leaked();
}
