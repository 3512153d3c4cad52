//! Money budgets and rate limits that hold across replicas and restarts (issue 15), with the real
//! `keygate` binary in front of the recording fake Stripe, and a real `redis-server`:
//!
//! - three keygate instances share one budget over Redis: concurrent payment-intent creations
//!   through all three are allowed exactly as far as they fit, and the fake Stripe received
//!   exactly the allowed ones;
//! - `kill -9` and a restart mid-window, with the `local` store and with `redis`: what was spent
//!   before still counts;
//! - Redis stopped during traffic: budgets answer 503 `keygate_limits_unavailable` and nothing
//!   reaches the fake Stripe; a rate limit configured to fail open lets requests through;
//!   `/readyz` and `/metrics` say why; Redis back: service resumes without a restart, and the
//!   counts from before the outage are still there;
//! - charges come back for requests refused after the decision (the audit WAL's write fails,
//!   the upstream is unreachable) and stay for unknown outcomes (an upstream timeout).
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::{RawResponse, get, request};
use keygate_tests::proxy_setup::{ProxySetup, SetupOptions};
use keygate_tests::redis::{PASSWORD, Redis};

fn budget(max: i64) -> String {
    format!("budgets:\n  usd: {{ max: {max}, window: 1h }}\n")
}

/// `POST /v1/payment_intents` of `amount` usd with an idempotency key.
fn pay(addr: SocketAddr, token: &str, amount: i64, key: &str) -> RawResponse {
    pay_with(addr, token, amount, key, &[])
}

fn pay_with(addr: SocketAddr, token: &str, amount: i64, key: &str, extra: &[(&str, &str)]) -> RawResponse {
    let mut headers = vec![("Idempotency-Key", key)];
    headers.extend_from_slice(extra);
    request(addr, "POST", "/v1/payment_intents", token, &headers, &format!("amount={amount}&currency=usd")).unwrap()
}

/// The idempotency keys of the payment intents the fake Stripe received.
fn received_payments(fake: &FakeStripe) -> Vec<String> {
    fake.received()
        .iter()
        .filter(|r| r.method == "POST" && r.path_and_query == "/v1/payment_intents")
        .map(|r| r.header("idempotency-key").unwrap_or_default().to_owned())
        .collect()
}

/// The value of the sample `name{labels…}` (every label given must be on the line).
fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let rest = line.strip_prefix(name)?;
        if !(rest.starts_with('{') || rest.starts_with(' ')) || !labels.iter().all(|l| rest.contains(l)) {
            return None;
        }
        line.rsplit_once(' ').and_then(|(_, v)| v.parse().ok())
    })
}

fn code(response: &RawResponse) -> String {
    response.json()["error"]["code"].as_str().unwrap_or_default().to_owned()
}

fn wait_ready(addr: SocketAddr, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        let (status, body) = get(addr, "/readyz").unwrap();
        if status == 200 || Instant::now() > deadline {
            return body;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_share_one_budget_over_redis_and_allow_exactly_what_fits() {
    let redis = Redis::start();
    let fake = FakeStripe::start(Behavior::Ok).await;
    let setups: Vec<ProxySetup> = (0..3)
        .map(|_| {
            let mut options = SetupOptions::new(&fake.url());
            options.policy_extra = budget(10_000);
            options.extra_config = redis.limit_store_yaml("2s", "1s", "");
            ProxySetup::start(options)
        })
        .collect();
    let targets: Vec<(SocketAddr, String)> = setups.iter().map(|s| (s.keygate.proxy, s.token.clone())).collect();

    // 45 payments of 700 at once, 15 through each instance, from 9 threads: 14 fit in 10,000.
    let results = tokio::task::spawn_blocking(move || {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..9)
                .map(|thread| {
                    let targets = &targets;
                    scope.spawn(move || {
                        (0..5)
                            .map(|i| {
                                let n = thread * 5 + i;
                                let (addr, token) = &targets[n % 3];
                                let key = format!("shared-{n}");
                                let response = pay(*addr, token, 700, &key);
                                (key, n % 3, response)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles.into_iter().flat_map(|h| h.join().unwrap()).collect::<Vec<_>>()
        })
    })
    .await
    .unwrap();
    let allowed: HashSet<String> =
        results.iter().filter(|(_, _, r)| r.status == 200).map(|(key, _, _)| key.clone()).collect();
    for (key, _, response) in &results {
        if response.status != 200 {
            assert_eq!(response.status, 403, "{key}: {}", response.body);
            assert_eq!(code(response), "keygate_budget_exceeded", "{}", response.body);
        }
    }
    assert_eq!(allowed.len(), 14, "exactly the payments that fit in 10,000 are allowed, across three instances");
    let instances: HashSet<usize> = results.iter().filter(|(_, _, r)| r.status == 200).map(|(_, i, _)| *i).collect();
    eprintln!("shared budget: {} allowed, through instances {instances:?}", allowed.len());
    // What the fake Stripe received is exactly what was allowed: nothing refused went upstream.
    let received: HashSet<String> = received_payments(&fake).into_iter().collect();
    assert_eq!(received, allowed);

    // The boundary, across replicas: 200 is left; 201 through one instance is refused, 200
    // through another is allowed, then nothing more through the third.
    let (a, b, c) = (&setups[0], &setups[1], &setups[2]);
    let (a_addr, a_token) = (a.keygate.proxy, a.token.clone());
    let (b_addr, b_token) = (b.keygate.proxy, b.token.clone());
    let (c_addr, c_token) = (c.keygate.proxy, c.token.clone());
    let (over, fits, none) = tokio::task::spawn_blocking(move || {
        (
            pay(a_addr, &a_token, 201, "edge-over"),
            pay(b_addr, &b_token, 200, "edge-fits"),
            pay(c_addr, &c_token, 1, "edge-none"),
        )
    })
    .await
    .unwrap();
    assert_eq!(over.status, 403, "{}", over.body);
    assert!(
        over.json()["error"]["message"].as_str().unwrap().contains("9800 spent, this request 201"),
        "{}",
        over.body
    );
    assert_eq!(fits.status, 200, "{}", fits.body);
    assert_eq!(none.status, 403, "{}", none.body);
    // Each instance's metrics show what the store told it.
    let metrics = b.keygate.metrics();
    assert_eq!(metric(&metrics, "keygate_budget_spent", &["service=\"checkout\"", "currency=\"usd\""]), Some(10_000.0));
    assert_eq!(metric(&metrics, "keygate_budget_remaining", &["currency=\"usd\""]), Some(0.0));
    for setup in &setups {
        setup.assert_no_secret_leaked();
        let text = setup.keygate.stderr_text() + &setup.keygate.metrics();
        assert!(!text.contains(PASSWORD), "the Redis password leaked");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_survives_kill_9_and_a_restart_with_the_local_store_and_with_redis() {
    let redis = Redis::start();
    let fake = FakeStripe::start(Behavior::Ok).await;
    for store in ["local", "redis"] {
        let mut options = SetupOptions::new(&fake.url());
        options.policy_extra = budget(10_000);
        if store == "redis" {
            options.extra_config = redis.limit_store_yaml("2s", "1s", "");
        }
        let mut setup = ProxySetup::start(options);
        let (addr, token) = (setup.keygate.proxy, setup.token.clone());
        let first =
            tokio::task::spawn_blocking(move || pay(addr, &token, 6000, &format!("{store}-before"))).await.unwrap();
        assert_eq!(first.status, 200, "{store}: {}", first.body);

        setup.kill_and_restart(&[]);
        let (addr, token) = (setup.keygate.proxy, setup.token.clone());
        let (again, rest) = tokio::task::spawn_blocking(move || {
            (pay(addr, &token, 6000, &format!("{store}-after")), pay(addr, &token, 4000, &format!("{store}-rest")))
        })
        .await
        .unwrap();
        assert_eq!(again.status, 403, "{store}: the 6000 spent before kill -9 still counts: {}", again.body);
        assert!(again.json()["error"]["message"].as_str().unwrap().contains("6000 spent"), "{store}: {}", again.body);
        assert_eq!(rest.status, 200, "{store}: what is left can be spent: {}", rest.body);
        if store == "local" {
            assert!(
                setup.dir.path().join("keygate-data/limits.redb").is_file(),
                "the local store is in the data folder"
            );
        }
    }
    let received = received_payments(&fake);
    assert_eq!(received, ["local-before", "local-rest", "redis-before", "redis-rest"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_budgets_fail_closed_and_service_resumes_when_it_is_back() {
    let mut redis = Redis::start();
    let fake = FakeStripe::start(Behavior::Ok).await;
    // A: a budget (always fails closed). B: a rate limit configured to fail open.
    let mut options = SetupOptions::new(&fake.url());
    options.policy_extra = budget(10_000);
    options.extra_config = redis.limit_store_yaml("300ms", "200ms", "");
    let a = ProxySetup::start(options);
    let mut options = SetupOptions::new(&fake.url());
    options.policy_extra = "rate_limit: { per_second: 1000, burst: 1000 }\n".to_owned();
    options.extra_config = redis.limit_store_yaml("300ms", "200ms", "  rate_limits_on_unavailable: open\n");
    let b = ProxySetup::start(options);
    let (a_addr, a_token, a_admin) = (a.keygate.proxy, a.token.clone(), a.keygate.admin);
    let (b_addr, b_token) = (b.keygate.proxy, b.token.clone());

    let before = tokio::task::spawn_blocking({
        let token = a_token.clone();
        move || pay(a_addr, &token, 1000, "outage-before")
    })
    .await
    .unwrap();
    assert_eq!(before.status, 200, "{}", before.body);

    redis.stop();
    let (refused, read, readyz) = tokio::task::spawn_blocking({
        let (a_token, b_token) = (a_token.clone(), b_token.clone());
        move || {
            let refused: Vec<RawResponse> =
                (0..3).map(|i| pay(a_addr, &a_token, 500, &format!("outage-{i}"))).collect();
            let read = request(b_addr, "GET", "/v1/balance", &b_token, &[], "").unwrap();
            // The probe notices within a probe interval and a timeout.
            std::thread::sleep(Duration::from_millis(600));
            (refused, read, get(a_admin, "/readyz").unwrap())
        }
    })
    .await
    .unwrap();
    for response in &refused {
        assert_eq!(response.status, 503, "{}", response.body);
        let json = response.json();
        assert_eq!(json["error"]["type"], "api_error");
        assert_eq!(json["error"]["code"], "keygate_limits_unavailable");
        let message = json["error"]["message"].as_str().unwrap();
        assert!(message.contains("money budget") && message.contains("limit_store"), "{message}");
        assert!(message.contains("Nothing was sent to Stripe"), "{message}");
        assert_eq!(response.header("stripe-should-retry"), Some("true"));
    }
    assert_eq!(read.status, 200, "a rate limit that fails open lets the request through: {}", read.body);
    // Nothing was forwarded that was not charged.
    assert_eq!(received_payments(&fake), ["outage-before"]);
    assert_eq!(readyz.0, 503, "{}", readyz.1);
    assert!(readyz.1.contains("limit store is unavailable"), "{}", readyz.1);
    let metrics = a.keygate.metrics();
    assert_eq!(metric(&metrics, "keygate_limit_store_available", &[]), Some(0.0), "{metrics}");
    assert!(metric(&metrics, "keygate_limit_store_errors_total", &["operation=\"charge\""]).unwrap_or(0.0) >= 3.0);
    let refusals = metric(&metrics, "keygate_requests_refused_total", &["reason=\"keygate_limits_unavailable\""]);
    assert_eq!(refusals, Some(3.0), "{metrics}");
    assert!(metric(&b.keygate.metrics(), "keygate_rate_limit_fail_open_total", &["service=\"checkout\""]) >= Some(1.0));

    // Redis back: no restart, the probe recovers, and the 1000 from before still counts.
    redis.resume();
    let ready = tokio::task::spawn_blocking(move || wait_ready(a_admin, Duration::from_secs(10))).await.unwrap();
    assert_eq!(ready, "ready\n", "keygate recovers by itself once Redis is back");
    let (after, over) = tokio::task::spawn_blocking(move || {
        (pay(a_addr, &a_token, 500, "outage-after"), pay(a_addr, &a_token, 8501, "outage-over"))
    })
    .await
    .unwrap();
    assert_eq!(after.status, 200, "{}", after.body);
    assert_eq!(over.status, 403, "1500 spent before and after the outage: {}", over.body);
    assert!(over.json()["error"]["message"].as_str().unwrap().contains("1500 spent"), "{}", over.body);
    assert_eq!(metric(&a.keygate.metrics(), "keygate_limit_store_available", &[]), Some(1.0));
    assert_eq!(received_payments(&fake), ["outage-before", "outage-after"]);
    a.assert_no_secret_leaked();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn charges_come_back_for_requests_refused_after_the_decision_and_stay_for_unknown_outcomes() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let u = fake.url();
    let mut options = SetupOptions::new(&u);
    options.policy_extra = budget(1000);
    options.audit = true;
    options.hosts_yaml =
        Some(format!("  api: {u}\n  files: {u}\n  connect: {u}\n  meter_events: {u}\n  timeout: 1s\n"));
    options.env = vec![("KEYGATE_TEST_HOOKS".to_owned(), "1".to_owned())];
    let setup = ProxySetup::start(options);
    let (addr, token) = (setup.keygate.proxy, setup.token.clone());

    // The audit WAL's write of the intent fails (its own fault hook): refused with nothing sent,
    // and the 600 comes back, so a second 600 fits in 1000.
    let fault = [("x-keygate-test-wal-fault", "write")];
    let (refused, allowed) = tokio::task::spawn_blocking({
        let token = token.clone();
        move || {
            let refused = pay_with(addr, &token, 600, "refund-audit", &fault);
            // The WAL opens a new segment on its next write; a 503 meanwhile is refunded too.
            let mut allowed = pay(addr, &token, 600, "refund-next");
            for _ in 0..20 {
                if allowed.status != 503 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
                allowed = pay(addr, &token, 600, "refund-next");
            }
            (refused, allowed)
        }
    })
    .await
    .unwrap();
    assert_eq!(refused.status, 503, "{}", refused.body);
    assert_eq!(code(&refused), "keygate_audit_unavailable");
    assert_eq!(allowed.status, 200, "the refused request's charge was given back: {}", allowed.body);
    assert_eq!(received_payments(&fake), ["refund-next"]);
    let metrics = setup.keygate.metrics();
    assert!(
        metric(&metrics, "keygate_budget_refunds_total", &["service=\"checkout\"", "currency=\"usd\""]) >= Some(1.0),
        "{metrics}"
    );

    // Unknown outcome: sent, no answer within the upstream timeout. The 300 stays charged, so
    // 600 + 300 leaves 100 and the next 300 is refused.
    fake.set_behavior(Behavior::Hang);
    let unknown = tokio::task::spawn_blocking({
        let token = token.clone();
        move || pay(addr, &token, 300, "unknown-outcome")
    })
    .await
    .unwrap();
    assert_eq!(unknown.status, 504, "{}", unknown.body);
    fake.set_behavior(Behavior::Ok);
    let next = tokio::task::spawn_blocking(move || pay(addr, &token, 300, "after-unknown")).await.unwrap();
    assert_eq!(next.status, 403, "{}", next.body);
    assert!(next.json()["error"]["message"].as_str().unwrap().contains("900 spent"), "{}", next.body);
    assert_eq!(received_payments(&fake), ["refund-next", "unknown-outcome"]);

    // The upstream unreachable (nothing listens): refused before sending, and refunded, so the
    // second attempt is refused for the same reason, not for the budget.
    let closed = format!("http://127.0.0.1:{}", keygate_tests::free_port());
    let mut options = SetupOptions::new(&closed);
    options.policy_extra = budget(1000);
    let unreachable = ProxySetup::start(options);
    let (addr, token) = (unreachable.keygate.proxy, unreachable.token.clone());
    let (first, second) = tokio::task::spawn_blocking(move || {
        (pay(addr, &token, 600, "unreachable-1"), pay(addr, &token, 600, "unreachable-2"))
    })
    .await
    .unwrap();
    for response in [&first, &second] {
        assert_eq!(response.status, 502, "{}", response.body);
        assert_eq!(code(response), "keygate_upstream_unreachable");
    }
    let metrics = unreachable.keygate.metrics();
    assert_eq!(metric(&metrics, "keygate_budget_refunds_total", &["currency=\"usd\""]), Some(2.0), "{metrics}");
    setup.assert_no_secret_leaked();
}
