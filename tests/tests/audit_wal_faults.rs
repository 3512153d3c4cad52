//! The audit WAL's disk fills up under a running `keygate` (the real binary, in front of the fake
//! Stripe upstream): requests get 503 `keygate_audit_unavailable` in Stripe's error JSON, nothing
//! is forwarded without its record, `/readyz` and `/metrics` say why, and keygate recovers by
//! itself, with no restart, once the file system grows again. After a graceful stop the lake holds
//! exactly one row per 2xx answer the client received.
//!
//! The WAL folder is on a small tmpfs that this test mounts, so it runs as root (as CI does).
//! Traffic fills the WAL until little room is left; a filler file then takes the last free page
//! (as another writer on the same volume would), so that the write that finds the disk full is
//! known: the intent of a mutation whose body is larger than a page, before anything is
//! forwarded. (A request whose own write is the first to fail after it was forwarded is the
//! outbox's case, recorded as `outcome = unknown`; it is not what this test is about.)
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use keygate_tests::audit::{auditlog, query_lake};
use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::{RawResponse, get, request};
use keygate_tests::keygate::{Keygate, KeygateOptions};
use keygate_tests::proxy_setup::{CANARY_KEY, allow_all_checkout_policy, audit_yaml_with_wal};

/// A tmpfs mounted for the test, lazily unmounted on drop (even on panic).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap_or_else(|e| panic!("could not run mount(8): {e}"));
        assert!(
            out.status.success(),
            "this test puts keygate's WAL folder on a small tmpfs and so must run as root with \
             mount(8) allowed (as CI does); `mount -t tmpfs -o size={size} tmpfs {}` failed: {}",
            at.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    fn resize(&self, size: &str) {
        let out = Command::new("mount").args(["-o", &format!("remount,size={size}")]).arg(&self.0).output().unwrap();
        assert!(out.status.success(), "growing the tmpfs failed: {}", String::from_utf8_lossy(&out.stderr));
    }

    /// Bytes still free on the file system.
    fn free_bytes(&self) -> u64 {
        let out = Command::new("stat").args(["-f", "-c", "%a %S"]).arg(&self.0).output().unwrap();
        assert!(out.status.success(), "stat -f failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().unwrap());
        fields.next().unwrap() * fields.next().unwrap()
    }

    /// Takes every free byte with a filler file; returns how many it took.
    fn fill(&self) -> u64 {
        let mut file = std::fs::File::create(self.0.join("filler")).unwrap();
        let chunk = [0x5au8; 4096];
        let mut taken = 0u64;
        loop {
            match file.write(&chunk) {
                Ok(0) => break,
                Ok(n) => taken += n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("filling the tmpfs: {e}"),
            }
        }
        taken
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// `n` random lowercase letters: incompressible enough that a body carrying them makes a WAL
/// frame larger than a memory page, and shaped like no secret or card number (no digits, no `_`).
fn random_letters(n: usize) -> String {
    let mut bytes = vec![0u8; n];
    let mut file = std::fs::File::open("/dev/urandom").unwrap();
    std::io::Read::read_exact(&mut file, &mut bytes).unwrap();
    bytes.iter().map(|b| char::from(b'a' + b % 26)).collect()
}

/// The value of an unlabelled sample in Prometheus text, or `None` if absent.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

/// What the client sent and got, and how to recognise the request upstream.
#[derive(Debug, Clone)]
struct Sent {
    /// `POST <idempotency key>` or `GET <path>`: what the fake upstream sees.
    label: String,
    status: u16,
    event_id: String,
    response: RawResponse,
}

struct Client<'a> {
    keygate: &'a Keygate,
    fake: &'a FakeStripe,
    token: String,
    sent: Vec<Sent>,
    n: usize,
}

impl Client<'_> {
    /// `POST /v1/payment_intents` with a form body (`note_len` random letters in its metadata).
    fn post(&mut self, note_len: usize) -> Sent {
        self.n += 1;
        let key = format!("walfault-{}", self.n);
        let body = format!("amount={}&currency=usd&metadata[note]={}", 1000 + self.n, random_letters(note_len));
        let response = request(
            self.keygate.proxy,
            "POST",
            "/v1/payment_intents",
            &self.token,
            &[("Idempotency-Key", &key)],
            &body,
        )
        .unwrap_or_else(|e| panic!("POST {key}: {e}"));
        self.record(format!("POST {key}"), response)
    }

    /// `GET /v1/customers/<id>`, a distinct path per request.
    fn get(&mut self) -> Sent {
        self.n += 1;
        let path = format!("/v1/customers/cus_walfault{}", self.n);
        let response = request(self.keygate.proxy, "GET", &path, &self.token, &[], "")
            .unwrap_or_else(|e| panic!("GET {path}: {e}"));
        self.record(format!("GET {path}"), response)
    }

    fn record(&mut self, label: String, response: RawResponse) -> Sent {
        let event_id = response.header("keygate-event-id").unwrap_or_default().to_owned();
        assert!(!event_id.is_empty(), "{label}: no keygate-event-id header: {response:?}");
        let sent = Sent { label, status: response.status, event_id, response };
        self.sent.push(sent.clone());
        sent
    }

    /// What the fake upstream received, labelled like [`Sent::label`].
    fn upstream(&self) -> Vec<String> {
        self.fake
            .received()
            .iter()
            .map(|r| match r.method.as_str() {
                "POST" => format!("POST {}", r.header("idempotency-key").unwrap_or("<no idempotency key>")),
                method => format!("{method} {}", r.path_and_query),
            })
            .collect()
    }

    /// The labels of every request answered 2xx so far.
    fn answered_2xx(&self) -> Vec<String> {
        self.sent.iter().filter(|s| (200..300).contains(&s.status)).map(|s| s.label.clone()).collect()
    }

    /// Every request the upstream saw was answered 2xx, and every 2xx answer was forwarded once.
    fn assert_upstream_saw_exactly_the_2xx(&self, when: &str) {
        let mut upstream = self.upstream();
        let mut answered = self.answered_2xx();
        upstream.sort();
        answered.sort();
        let refused_but_forwarded: Vec<&Sent> =
            self.sent.iter().filter(|s| s.status >= 300 && upstream.contains(&s.label)).collect();
        assert!(
            refused_but_forwarded.is_empty(),
            "{when}: requests answered non-2xx were forwarded to Stripe: {:?}",
            refused_but_forwarded.iter().map(|s| (&s.label, s.status, &s.response.body)).collect::<Vec<_>>()
        );
        assert_eq!(upstream, answered, "{when}: the upstream saw exactly the requests answered 2xx, once each");
    }
}

/// A 503 `keygate_audit_unavailable` in Stripe's error JSON that says what is wrong and what to do.
fn assert_audit_refusal(sent: &Sent, token: &str) {
    let r = &sent.response;
    assert_eq!(r.status, 503, "{}: {r:?}", sent.label);
    assert_eq!(r.header("content-type"), Some("application/json"), "{}: {r:?}", sent.label);
    let json = r.json();
    let error = &json["error"];
    assert_eq!(error["type"], "api_error", "{}: {json}", sent.label);
    assert_eq!(error["code"], "keygate_audit_unavailable", "{}: {json}", sent.label);
    let message = error["message"].as_str().unwrap_or_else(|| panic!("{}: no message: {json}", sent.label));
    // What is wrong: the audit log cannot be written because its disk is full.
    assert!(message.contains("audit log"), "{}: the message names the audit log: {message}", sent.label);
    assert!(message.contains("No space left on device"), "{}: the message gives the cause: {message}", sent.label);
    // What it means and what to do.
    assert!(
        message.contains("Nothing was sent to Stripe"),
        "{}: a request that was not forwarded says so: {message}",
        sent.label
    );
    assert!(
        !message.contains("may have processed"),
        "{}: a request that was not forwarded must not claim Stripe may have processed it: {message}",
        sent.label
    );
    assert!(message.contains("check free space"), "{}: the message says what to check: {message}", sent.label);
    assert_eq!(r.header("stripe-should-retry"), Some("true"), "{}: an SDK may retry: {r:?}", sent.label);
    assert_eq!(r.header("retry-after"), Some("1"), "{}: {r:?}", sent.label);
    assert!(!r.body.contains(CANARY_KEY) && !r.body.contains(token), "{}: a secret in the error", sent.label);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_wal_disk_answers_503_forwards_nothing_and_recovers_when_space_returns() {
    // Dropped in reverse order: keygate, the fake upstream, the tmpfs, then the folder.
    let dir = tempfile::tempdir().unwrap();
    let walfs = Tmpfs::mount(&dir.path().join("walfs"), "512k");
    let fake = FakeStripe::start(Behavior::Ok).await;

    let policies = dir.path().join("policies");
    let token = allow_all_checkout_policy(&policies);
    let lake = dir.path().join("lake");
    let config = format!(
        "listen:\n  address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  api: {upstream}\n\
         policies:\n  dir: {policies}\nlog:\n  level: warn,keygate=info\n{audit}",
        upstream = fake.url(),
        policies = policies.display(),
        audit = audit_yaml_with_wal(dir.path(), &walfs.0.join("wal"), "  durability: sync\n"),
    );
    let keygate = Keygate::start(
        dir.path(),
        KeygateOptions {
            config: Some(&config),
            env: vec![("KG_E2E_STRIPE_KEY".to_owned(), CANARY_KEY.to_owned())],
            args: Vec::new(),
            wait_ready: true,
        },
    );
    let mut client = Client { keygate: &keygate, fake: &fake, token: token.clone(), sent: Vec::new(), n: 0 };

    // 1. Traffic fills the WAL: POST + GET pairs, all answered 200, until less than 64 KiB (a few
    //    pairs' worth) is left.
    let started = Instant::now();
    while walfs.free_bytes() >= 64 * 1024 {
        assert!(started.elapsed() < Duration::from_secs(120), "the WAL did not fill within 2 minutes");
        let post = client.post(6000);
        assert_eq!(post.status, 200, "{}: {:?}", post.label, post.response);
        let get = client.get();
        assert_eq!(get.status, 200, "{}: {:?}", get.label, get.response);
    }
    let filled_by_traffic = client.sent.len();
    assert!(filled_by_traffic >= 10, "only {filled_by_traffic} requests filled the WAL: is it on the tmpfs?");
    client.assert_upstream_saw_exactly_the_2xx("while the WAL had room");
    let failures_before = metric(&keygate.metrics(), "keygate_audit_wal_failures_total");
    assert_eq!(failures_before, Some(0.0), "keygate_audit_wal_failures_total is exported and 0 while healthy");

    // 2. The last free pages go to a filler file: the WAL folder is full.
    walfs.fill();
    assert_eq!(walfs.free_bytes(), 0, "the tmpfs is full");

    // A mutation whose intent cannot be written: refused, not forwarded.
    let first = client.post(12_000);
    assert_audit_refusal(&first, &token);
    client.assert_upstream_saw_exactly_the_2xx("after the first refusal");

    // While the disk stays full, every request is refused and none is forwarded: reads (which
    // have no intent) as well as mutations, small or large.
    for i in 0..12 {
        let sent = match i % 3 {
            0 => client.get(),
            1 => client.post(0),
            _ => client.post(12_000),
        };
        assert_audit_refusal(&sent, &token);
        client.assert_upstream_saw_exactly_the_2xx(&format!("while the WAL is full ({})", sent.label));
    }

    // /readyz says not ready, naming the audit WAL; the metric shows the failure.
    let (status, body) = get(keygate.admin, "/readyz").unwrap();
    assert_eq!(status, 503, "/readyz while the WAL is full: {body}");
    assert!(body.contains("audit WAL"), "/readyz names the audit WAL: {body}");
    assert!(body.contains("No space left on device"), "/readyz gives the cause: {body}");
    let metrics = keygate.metrics();
    let failures = metric(&metrics, "keygate_audit_wal_failures_total").unwrap();
    assert!(failures >= 1.0, "keygate_audit_wal_failures_total rises: {failures}");

    // keygate retries a new WAL segment every 500 ms; on a disk that is still full those retries
    // fail and it keeps refusing.
    std::thread::sleep(Duration::from_millis(1500));
    for sent in [client.get(), client.post(0)] {
        assert_audit_refusal(&sent, &token);
        client.assert_upstream_saw_exactly_the_2xx(&format!("1.5 s later, the WAL still full ({})", sent.label));
    }
    let (status, body) = get(keygate.admin, "/readyz").unwrap();
    assert_eq!(status, 503, "/readyz while the WAL is still full: {body}");
    eprintln!("WAL faults: refusal: {}\n/readyz: {body}", first.response.body);

    // 3. Space returns: keygate recovers by itself (no traffic needed, no restart).
    walfs.resize("16m");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = get(keygate.admin, "/readyz").unwrap();
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "keygate did not become ready within 15 s of space returning: {body}");
        std::thread::sleep(Duration::from_millis(50));
    }
    for _ in 0..3 {
        let post = client.post(6000);
        assert_eq!(post.status, 200, "after recovery {}: {:?}", post.label, post.response);
        let get = client.get();
        assert_eq!(get.status, 200, "after recovery {}: {:?}", get.label, get.response);
    }
    client.assert_upstream_saw_exactly_the_2xx("after recovery");

    // 4. A graceful stop commits the WAL; the lake holds exactly one row per 2xx answer.
    let answered: HashMap<String, String> =
        client.sent.iter().filter(|s| s.status == 200).map(|s| (s.event_id.clone(), s.label.clone())).collect();
    let refused: HashSet<String> = client.sent.iter().filter(|s| s.status != 200).map(|s| s.event_id.clone()).collect();
    assert_eq!(refused.len(), 15);
    drop(client);
    keygate.signal("TERM");
    let stderr_path = keygate.stderr.clone();
    assert_eq!(
        keygate.wait_exit(Duration::from_secs(60)),
        Some(0),
        "keygate exits 0 on SIGTERM; stderr:\n{}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );

    let rows = query_lake(&lake, "SELECT event_id, method, path, idempotency_key, status, outcome FROM audit");
    let mut seen = HashSet::new();
    for row in &rows {
        let id = row["event_id"].as_str().unwrap().to_owned();
        assert!(seen.insert(id.clone()), "duplicate row for {id}: {row}");
        assert!(!refused.contains(&id), "a request answered 503 has a row: {row}");
        let label = answered.get(&id).unwrap_or_else(|| panic!("a row for no 2xx answer: {row}"));
        assert_eq!(row["status"], 200, "{label}: {row}");
        assert_eq!(row["outcome"], "completed", "{label}: {row}");
        match label.split_once(' ') {
            Some(("POST", key)) => assert_eq!(row["idempotency_key"], key, "{row}"),
            Some((method, path)) => {
                assert_eq!(row["method"], method, "{row}");
                assert_eq!(row["path"], path, "{row}");
            }
            None => unreachable!(),
        }
    }
    let missing: Vec<&String> = answered.iter().filter(|(id, _)| !seen.contains(*id)).map(|(_, l)| l).collect();
    assert!(missing.is_empty(), "2xx answers without a row in the lake: {missing:?}");
    assert_eq!(rows.len(), answered.len(), "one row per 2xx answer");

    eprintln!(
        "WAL faults: {filled_by_traffic} requests filled the WAL, {} answered 200, {} refused, {} lake rows",
        answered.len(),
        refused.len(),
        rows.len()
    );
    let lake_arg = lake.display().to_string();
    let (code, out, err) = auditlog(&["verify", "--lake", &lake_arg], &[]);
    assert_eq!(code, 0, "the lake verifies after the WAL outage: {out}{err}");
    drop(walfs);
}
