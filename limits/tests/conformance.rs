//! The one conformance suite of the [`LimitStore`] contract, run by every store: `memory`,
//! `local` (a redb file in a temporary folder) and `redis` (a real `redis-server` started on a free
//! loopback port: with AUTH from a secret reference, over TLS with a private CA, and behind a
//! Sentinel; the test fails, never skips, when it is not installed).
//!
//! Each store gets the same checks, on the store's own clock (Redis's `TIME` cannot be set, so
//! the window check waits out a 1 s window): atomic check-and-charge under concurrency, the
//! boundary, forced charges, refunds, window expiry, separate keys, and GCRA rate limits.
#![allow(clippy::unwrap_used, clippy::expect_used)]

/// The one way to start a redis-server in tests (also used by keygate-tests, via the
/// `test-support` feature).
#[path = "../src/testing.rs"]
mod testing;

use std::sync::Arc;
use std::time::{Duration, Instant};

use keygate_limits::{
    BudgetKey, ChargeRequest, LimitStore, LocalStore, MemoryStore, RateOutcome, RateSpec, RedisStore, RedisStoreConfig,
    SystemClock,
};
use testing::{RedisOptions, RedisServer};

fn key(service: &str, currency: &str, window: Duration) -> BudgetKey {
    BudgetKey { service: service.to_owned(), currency: currency.to_owned(), window }
}

fn charge(key: &BudgetKey, max: i64, amount: i64) -> ChargeRequest {
    ChargeRequest { key: key.clone(), max, amount, force: false }
}

/// Every check of the contract, against one store. `tag` keeps stores' keys apart.
async fn conformance(store: Arc<dyn LimitStore>, tag: &str) {
    let hour = Duration::from_secs(3600);

    // The boundary: exactly max is allowed, one more is not, and a refusal counts nothing.
    let k = key(&format!("{tag}-boundary"), "usd", hour);
    let first = store.charge(&charge(&k, 100, 60)).await.unwrap();
    assert_eq!((first.spent_before, first.exceeded), (0, false), "{tag}");
    let receipt = first.charge.clone().expect("an allowed charge has a receipt");
    assert_eq!(receipt.amount, 60);
    assert!(!store.charge(&charge(&k, 100, 40)).await.unwrap().exceeded, "{tag}: spent + amount = max is allowed");
    let over = store.charge(&charge(&k, 100, 1)).await.unwrap();
    assert_eq!((over.spent_before, over.exceeded, over.charge), (100, true, None), "{tag}");
    assert_eq!(store.spent(&k).await.unwrap(), 100, "{tag}: a refused charge adds nothing");

    // Refund: gives back exactly the receipt; then the room is there again.
    store.refund(&receipt).await.unwrap();
    assert_eq!(store.spent(&k).await.unwrap(), 40, "{tag}");
    assert!(!store.charge(&charge(&k, 100, 60)).await.unwrap().exceeded, "{tag}");

    // Forced (report mode): charged over the ceiling, and reported as exceeded.
    let forced = store.charge(&ChargeRequest { key: k.clone(), max: 100, amount: 50, force: true }).await.unwrap();
    assert!(forced.exceeded && forced.charge.is_some(), "{tag}: {forced:?}");
    assert_eq!(store.spent(&k).await.unwrap(), 150, "{tag}");

    // Separate keys: another currency, service or window is another count.
    for other in [key(&format!("{tag}-boundary"), "eur", hour), key(&format!("{tag}-other"), "usd", hour)] {
        assert_eq!(store.spent(&other).await.unwrap(), 0, "{tag}: {other:?}");
    }
    assert_eq!(store.spent(&key(&format!("{tag}-boundary"), "usd", hour * 2)).await.unwrap(), 0, "{tag}");

    // Atomic check-and-charge: 40 concurrent charges of 70 against 1000 → exactly 14 fit.
    let k = key(&format!("{tag}-concurrent"), "usd", hour);
    let tasks: Vec<_> = (0..40)
        .map(|_| {
            let store = store.clone();
            let request = charge(&k, 1000, 70);
            tokio::spawn(async move { store.charge(&request).await.unwrap() })
        })
        .collect();
    let mut allowed = 0;
    for task in tasks {
        if !task.await.unwrap().exceeded {
            allowed += 1;
        }
    }
    assert_eq!(allowed, 14, "{tag}: exactly the charges that fit");
    assert_eq!(store.spent(&k).await.unwrap(), 14 * 70, "{tag}");

    // The window: an amount counts for the whole window, and is gone a window and a slot later.
    let second = Duration::from_secs(1);
    let k = key(&format!("{tag}-window"), "usd", second);
    let started = Instant::now();
    assert!(!store.charge(&charge(&k, 10, 10)).await.unwrap().exceeded, "{tag}");
    let refused = store.charge(&charge(&k, 10, 1)).await.unwrap();
    if started.elapsed() < Duration::from_millis(900) {
        assert!(refused.exceeded, "{tag}: within the window the amount still counts");
    }
    tokio::time::sleep(second + second / 60 + Duration::from_millis(50)).await;
    assert_eq!(store.spent(&k).await.unwrap(), 0, "{tag}: forgotten a window and a slot later");
    assert!(!store.charge(&charge(&k, 10, 10)).await.unwrap().exceeded, "{tag}");

    // Rate limit (GCRA): a burst of 5 at once, then limited with a retry-after of at most one
    // interval (10 s at 0.1/s), from concurrent callers.
    let rate = RateSpec { per_second: 0.1, burst: 5 };
    let service = format!("{tag}-rate");
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let store = store.clone();
            let service = service.clone();
            tokio::spawn(async move { store.acquire(&service, rate).await.unwrap() })
        })
        .collect();
    let mut outcomes = Vec::new();
    for task in tasks {
        outcomes.push(task.await.unwrap());
    }
    assert_eq!(outcomes.iter().filter(|o| **o == RateOutcome::Allowed).count(), 5, "{tag}: {outcomes:?}");
    for outcome in outcomes {
        if let RateOutcome::Limited { retry_after } = outcome {
            assert!(retry_after > Duration::ZERO && retry_after <= Duration::from_secs(10), "{tag}: {retry_after:?}");
        }
    }
    // A changed rate is a new limiter with a full burst.
    let changed = RateSpec { per_second: 0.1, burst: 2 };
    assert_eq!(store.acquire(&service, changed).await.unwrap(), RateOutcome::Allowed, "{tag}");
    // A fast rate refills: 20/s with a burst of 1 allows one, refuses the next, allows after 50 ms.
    let fast = RateSpec { per_second: 20.0, burst: 1 };
    let service = format!("{tag}-fast");
    assert_eq!(store.acquire(&service, fast).await.unwrap(), RateOutcome::Allowed, "{tag}");
    let RateOutcome::Limited { retry_after } = store.acquire(&service, fast).await.unwrap() else {
        panic!("{tag}: a second request at once is over a burst of 1");
    };
    assert!(retry_after <= Duration::from_millis(50), "{tag}: {retry_after:?}");
    tokio::time::sleep(Duration::from_millis(60)).await;
    assert_eq!(store.acquire(&service, fast).await.unwrap(), RateOutcome::Allowed, "{tag}");

    store.ping().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_store_conforms() {
    conformance(Arc::new(MemoryStore::new(Arc::new(SystemClock))), "memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_store_conforms_and_keeps_budgets_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("limits.redb");
    {
        let store = Arc::new(LocalStore::open(&path, Arc::new(SystemClock)).unwrap());
        conformance(store, "local").await;
    }
    // Let the writer thread of the dropped store release the file.
    let deadline = Instant::now() + Duration::from_secs(5);
    let reopened = loop {
        match LocalStore::open(&path, Arc::new(SystemClock)) {
            Ok(store) => break store,
            Err(error) if Instant::now() < deadline => {
                let _ = error;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(error) => panic!("reopening the local store: {error}"),
        }
    };
    let k = key("local-concurrent", "usd", Duration::from_secs(3600));
    assert_eq!(reopened.spent(&k).await.unwrap(), 14 * 70, "the budget survives closing and reopening");
    // A second store on the same file is refused while the first has it open.
    let error = LocalStore::open(&path, Arc::new(SystemClock)).unwrap_err().to_string();
    assert!(error.contains("another keygate"), "{error}");
}

fn redis_config(yaml: &str) -> RedisStoreConfig {
    serde_saphyr::from_str(&format!("{yaml}key_prefix: \"conformance:\"\n")).unwrap()
}

async fn secrets() -> keygate_secrets::SecretStore {
    keygate_secrets::SecretStore::new(&keygate_secrets::SecretsConfig::default()).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms_with_auth_from_a_secret_reference() {
    let password = "conformance-redis-password-canary";
    let mut redis = RedisServer::start(RedisOptions { password: Some(password.to_owned()), ..RedisOptions::default() });
    let password_file = redis.dir().join("redis-password");
    std::fs::write(&password_file, password).unwrap();
    let secrets = secrets().await;
    let config =
        redis_config(&format!("address: {}\npassword: \"file://{}\"\n", redis.address(), password_file.display()));
    let store = Arc::new(RedisStore::connect(&config, Duration::from_secs(2), &secrets).await.unwrap());
    conformance(store.clone(), "redis").await;

    // A wrong password is refused, and the error never quotes a password.
    let wrong_file = redis.dir().join("wrong");
    std::fs::write(&wrong_file, "not-the-password-canary").unwrap();
    let wrong = redis_config(&format!("address: {}\npassword: \"file://{}\"\n", redis.address(), wrong_file.display()));
    let wrong = RedisStore::connect(&wrong, Duration::from_secs(2), &secrets).await.unwrap();
    let error = wrong.ping().await.unwrap_err().to_string();
    assert!(!error.contains("canary"), "{error}");
    assert!(format!("{store:?}").contains("127.0.0.1") && !format!("{store:?}").contains("canary"));

    // Redis gone: operations fail, never "allowed" (recovery is tested end to end,
    // tests/tests/limits_shared.rs).
    redis.stop();
    let k = key("redis-gone", "usd", Duration::from_secs(60));
    assert!(store.charge(&charge(&k, 100, 1)).await.is_err());
    assert!(store.acquire("redis-gone", RateSpec { per_second: 1.0, burst: 1 }).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms_over_tls_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let server_key = rcgen::KeyPair::generate().unwrap();
    let server_params = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
    let server_cert = server_params.signed_by(&server_key, &issuer).unwrap();
    let (cert, key_file, ca) =
        (dir.path().join("server.crt"), dir.path().join("server.key"), dir.path().join("ca.crt"));
    std::fs::write(&cert, server_cert.pem()).unwrap();
    std::fs::write(&key_file, server_key.serialize_pem()).unwrap();
    std::fs::write(&ca, ca_cert.pem()).unwrap();
    let redis = RedisServer::start(RedisOptions { tls: Some((cert, key_file, ca.clone())), ..RedisOptions::default() });
    let secrets = secrets().await;
    let config = redis_config(&format!("address: {}\ntls:\n  ca_file: {}\n", redis.address(), ca.display()));
    let store = Arc::new(RedisStore::connect(&config, Duration::from_secs(2), &secrets).await.unwrap());
    conformance(store, "redis-tls").await;
    // Without the private CA (the system's roots), the server's certificate is refused.
    let untrusted = redis_config(&format!("address: {}\ntls: {{}}\n", redis.address()));
    let untrusted = RedisStore::connect(&untrusted, Duration::from_secs(2), &secrets).await.unwrap();
    assert!(untrusted.ping().await.is_err(), "a certificate from an unknown CA is accepted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_store_conforms_behind_sentinel() {
    let password = "conformance-sentinel-password";
    let redis = RedisServer::start(RedisOptions { password: Some(password.to_owned()), ..RedisOptions::default() });
    let sentinel = redis.sentinel("keygate-limits");
    let password_file = redis.dir().join("redis-password");
    std::fs::write(&password_file, password).unwrap();
    let config = redis_config(&format!(
        "sentinel:\n  addresses: [\"127.0.0.1:{}\"]\n  master_name: keygate-limits\npassword: \"file://{}\"\n",
        sentinel.port,
        password_file.display()
    ));
    let store = Arc::new(RedisStore::connect(&config, Duration::from_secs(2), &secrets().await).await.unwrap());
    conformance(store, "redis-sentinel").await;
}
