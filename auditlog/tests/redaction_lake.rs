//! Redaction through the real writer: exchanges carrying planted card numbers, CVCs, bank and
//! identity numbers and secrets in every encoding go through `AuditLog::record` into the WAL
//! and the lake; no canary is found in any raw WAL or lake byte, in any decoded column, nor in
//! any decrypted payload. And the strings that made the audit phase panic (ASCII digits mixed
//! with Arabic-Indic ones) produce a row.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use keygate_auditlog::payload::prepare_reporting;
use keygate_auditlog::{Exchange, HttpMessage, Outcome};

const PAN: &str = "4000056655665556";
const PAN_WRITTEN: &[&str] = &["4000.0566.5566.5556", "4000 /0566/ 5566 /5556", "abc4000056655665556xyz"];
const PAN_FAILING_LUHN: &str = "4929123412341235";
const TOKEN_BODY: &str = "Kg-_CANARYbase64url0123456789abcdefghij-_xyz";
const LIVE_BODY: &str = "51CANARYliveKEY0123456789";
const CLIENT_SECRET_BODY: &str = "CANARYcheckoutSecret0123";
const CUSS_BODY: &str = "CANARYcustomerSession0123";
const IBAN: &str = "DE89CANARY0440532013000";
const ACCOUNT: &str = "CANARYACCT000123456";
const SSN4: &str = "CANARYSSN4";
const DOB_YEAR: &str = "CANARYYEAR";
const ID_NUMBER: &str = "CANARYIDNUMBER77";
const CVC_NAME_MARK: &str = "cvc";

fn token() -> String {
    format!("sk_kg_{TOKEN_BODY}")
}

/// Every string that must not survive anywhere.
fn canaries() -> Vec<String> {
    let mut v: Vec<String> =
        [TOKEN_BODY, LIVE_BODY, CLIENT_SECRET_BODY, CUSS_BODY, IBAN, ACCOUNT, SSN4, DOB_YEAR, ID_NUMBER]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
    v.extend(PAN_WRITTEN.iter().map(|s| (*s).to_owned()));
    v.push(PAN.get(..12).unwrap().to_owned());
    v.push(PAN_FAILING_LUHN.get(..12).unwrap().to_owned());
    v
}

fn base(method: &str, path: &str) -> Exchange {
    let mut ex = Exchange::new(uuid::Uuid::now_v7(), method, path);
    ex.received_at = std::time::SystemTime::now();
    ex.completed_at = ex.received_at + Duration::from_millis(2);
    ex.service = Some("checkout".into());
    ex.peer = "192.168.100.200:54321".into();
    ex.status = 200;
    ex.outcome = Outcome::Completed;
    ex.idempotency_key = Some(format!("idem-{}", token()));
    ex.reason = Some(format!("note {}", PAN_WRITTEN[0]));
    ex
}

fn request(start_line: &str, content_type: Option<&str>, body: &str) -> HttpMessage {
    let mut headers = vec![
        ("Authorization".to_owned(), format!("Bearer {}", token()).into_bytes()),
        ("User-Agent".to_owned(), format!("sdk/1 {} {}", token(), PAN_WRITTEN[1]).into_bytes()),
        ("X-Custom".to_owned(), format!("sk_live_{LIVE_BODY}").into_bytes()),
    ];
    if let Some(ct) = content_type {
        headers.push(("Content-Type".to_owned(), ct.as_bytes().to_vec()));
    }
    HttpMessage { start_line: start_line.to_owned(), headers, body: Bytes::from(body.to_owned()) }
}

fn json_response(body: &serde_json::Value) -> HttpMessage {
    HttpMessage {
        start_line: "HTTP/1.1 200 OK".into(),
        headers: vec![("Content-Type".into(), b"application/json".to_vec()), ("Request-Id".into(), b"req_1".to_vec())],
        body: Bytes::from(body.to_string()),
    }
}

/// One exchange per encoding, each carrying canaries.
fn exchanges() -> Vec<Exchange> {
    let form = format!(
        "amount=1234&card[number]={}&card[cvc][]=739&external_account[iban]={IBAN}&external_account[account_number]={ACCOUNT}\
         &individual[ssn_last_4]={SSN4}&individual[dob][year]={DOB_YEAR}&individual[id_number]={ID_NUMBER}\
         &metadata[note]=pay+sk_live_{LIVE_BODY}+and+{}&metadata[other]={PAN_FAILING_LUHN}",
        PAN_WRITTEN[0].replace(' ', "+"),
        PAN_WRITTEN[2],
    );
    let mut out = Vec::new();

    let path = format!("/v1/payment_intents?api_key={}&card[number]={PAN}&expand[]=x", token());
    let mut ex = base("POST", &path);
    ex.request = request(&format!("POST {path} HTTP/1.1"), Some("application/x-www-form-urlencoded"), &form);
    ex.response = Some(json_response(&serde_json::json!({
        "id": "cs_test_a1B2", "object": "checkout.session", "amount": 1234,
        "client_secret": format!("cs_test_a1B2_secret_{CLIENT_SECRET_BODY}"),
        "description": format!("free text cs_test_a1B2_secret_{CLIENT_SECRET_BODY} and cuss_secret_{CUSS_BODY}"),
        "card": {"number": PAN.parse::<u64>().unwrap(), "cvc": 739},
    })));
    out.push(ex);

    let v2 = serde_json::json!({"a": {"b": {"c": {"payment_method_data": {"card": {"number": PAN_WRITTEN[1], "cvc": "739"}},
        "bank": [{"iban": IBAN, "account_number": ACCOUNT}], "individual": {"dob": {"year": DOB_YEAR}, "ssn_last_4": SSN4,
        "id_number": ID_NUMBER}, "note": format!("key sk_live_{LIVE_BODY}"), "n": PAN_FAILING_LUHN.parse::<u64>().unwrap()}}}});
    let mut ex = base("POST", "/v2/core/accounts");
    ex.request = request("POST /v2/core/accounts HTTP/1.1", Some("application/json"), &v2.to_string());
    out.push(ex);

    for (ct, body) in
        [(Some("text/plain"), form.clone()), (None, form.replace('&', ";")), (None, format!("card {PAN} cvc 739"))]
    {
        let mut ex = base("POST", "/v1/payment_methods");
        ex.request = request("POST /v1/payment_methods HTTP/1.1", ct, &body);
        out.push(ex);
    }

    // An unauthenticated request.
    let mut ex = base("GET", "/v1/charges");
    ex.service = None;
    ex.decision = "deny".into();
    ex.status = 401;
    ex.outcome = Outcome::Rejected;
    ex.request = request("GET /v1/charges HTTP/1.1", None, "");
    ex.request.headers.push(("X-Keygate-Token".into(), token().into_bytes()));
    out.push(ex);
    out
}

fn digits_only(s: &str) -> String {
    s.chars().filter(char::is_ascii_digit).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planted_canaries_in_every_encoding_never_reach_wal_lake_columns_or_payloads() {
    let env = env();
    let log = env.open().await;
    let all = exchanges();
    let n = all.len();
    let mut intent = all[0].clone();
    intent.event_id = uuid::Uuid::now_v7();
    let intent_id = log.record_intent(&intent).await.unwrap();
    for ex in all {
        log.record(ex, None).await.unwrap();
    }
    let wal_bytes = files_under(&env.cfg.wal_dir);
    log.record(intent, Some(intent_id)).await.unwrap();
    let metrics_text = {
        let mut registry = prometheus_client::registry::Registry::default();
        log.register_metrics(&mut registry);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        text
    };
    assert!(metrics_text.contains("keygate_audit_redaction_failures_total 0"), "{metrics_text}");
    log.shutdown().await.unwrap();
    let lake_bytes = files_under(&env.lake_dir());
    assert!(lake_bytes.iter().any(|(p, _)| p.extension().is_some_and(|e| e == "parquet")));
    let canaries = canaries();
    for (path, bytes) in wal_bytes.iter().chain(lake_bytes.iter()) {
        for canary in &canaries {
            assert!(!contains(bytes, canary.as_bytes()), "{canary} found in {}", path.display());
        }
    }
    let rows = read_lake(&open_lake(&env.lake_dir())).await;
    assert_eq!(rows.len(), n + 1);
    let ring = env.ring();
    for r in &rows {
        let cols = serde_json::to_value(&r.row.columns).unwrap();
        let doc = serde_json::to_value(decrypt(&ring, r).await).unwrap();
        let text = format!("{cols}\n{doc}");
        for canary in &canaries {
            assert!(!text.contains(canary.as_str()), "{canary} survived redaction: {text}");
        }
        assert!(!text.to_lowercase().contains(CVC_NAME_MARK), "a CVC field survived: {text}");
        let mut strings = Vec::new();
        strings_of(&cols, &mut strings);
        strings_of(&doc, &mut strings);
        for pan in [PAN, PAN_FAILING_LUHN] {
            for w in 0..=4 {
                let window = pan.get(w..w + 8).unwrap();
                for s in &strings {
                    assert!(!digits_only(s).contains(window), "digits {window} of {pan} survived in {s:?}");
                }
            }
        }
        // The peer (a socket address keygate wrote) is kept as it is.
        assert_eq!(r.row.columns.peer, "192.168.100.200:54321");
        assert!(r.row.columns.path.starts_with("/v"), "{}", r.row.columns.path);
    }
    // What is kept: the masked card's last 4 and the amount.
    let first = rows.iter().find(|r| r.row.columns.path.starts_with("/v1/payment_intents")).unwrap();
    let doc = serde_json::to_string(&decrypt(&ring, first).await).unwrap();
    assert!(doc.contains("****5556") && doc.contains("1234"), "{doc}");
}

/// The strings that made the audit phase panic before this was fixed.
const MIXED: &[&str] = &["4242424242424242٤٤٤٤", "1234567890123٤٤٤٤", "٤٤٤٤4242424242424242", "12٤٤"];

#[test]
fn strings_that_panicked_produce_a_row() {
    for s in MIXED {
        let enc: String = url::form_urlencoded::byte_serialize(s.as_bytes()).collect();
        let mut cases = Vec::new();
        // In the query string (raw and percent-encoded).
        for q in [s.to_string(), enc.clone()] {
            let path = format!("/v1/customers?email={q}&card[number]={q}");
            let mut ex = base("GET", &path);
            ex.request = request(&format!("GET {path} HTTP/1.1"), None, "");
            cases.push(("query", ex));
        }
        // In a header.
        let mut ex = base("POST", "/v1/customers");
        ex.request = request("POST /v1/customers HTTP/1.1", Some("application/x-www-form-urlencoded"), "email=a");
        ex.request.headers.push(("User-Agent".into(), s.as_bytes().to_vec()));
        ex.request.headers.push(("Stripe-Account".into(), s.as_bytes().to_vec()));
        ex.stripe_account = Some((*s).to_owned());
        cases.push(("header", ex));
        // In the body, form and JSON and text.
        for (ct, body) in [
            (Some("application/x-www-form-urlencoded"), format!("metadata[x]={enc}&card[number]={enc}")),
            (Some("application/json"), serde_json::json!({"card": {"number": s}, "d": s}).to_string()),
            (Some("text/plain"), (*s).to_owned()),
            (None, (*s).to_owned()),
        ] {
            let mut ex = base("POST", "/v1/customers");
            ex.request = request("POST /v1/customers HTTP/1.1", ct, &body);
            cases.push(("body", ex));
        }
        // In a response value.
        let mut ex = base("GET", "/v1/customers/cus_1");
        ex.response = Some(json_response(&serde_json::json!({"id": "cus_1", "description": s, "phone": s})));
        cases.push(("response", ex));
        // In an unauthenticated request's header.
        let mut ex = base("GET", "/v1/charges");
        ex.service = None;
        ex.decision = "deny".into();
        ex.status = 401;
        ex.outcome = Outcome::Rejected;
        ex.request = request("GET /v1/charges HTTP/1.1", None, "");
        ex.request.headers.retain(|(n, _)| n != "Authorization");
        ex.request.headers.push(("Authorization".into(), format!("Bearer {s}").into_bytes()));
        ex.request.headers.push(("X-Anything".into(), s.as_bytes().to_vec()));
        cases.push(("unauthenticated header", ex));

        for (place, ex) in cases {
            let (prepared, failed) = prepare_reporting(&ex, 3).unwrap_or_else(|e| panic!("{place} {s}: no row: {e}"));
            assert!(!failed, "{place} {s}: redaction fell back");
            let c = &prepared.columns;
            assert_eq!(c.event_id, ex.event_id);
            assert_eq!(c.method, ex.method);
            assert!(c.path.starts_with("/v1/"), "{place}: {}", c.path);
            assert_eq!(c.status, ex.status);
            assert_eq!(c.outcome, ex.outcome.as_str());
            assert_eq!(c.decision, ex.decision);
            assert!(!prepared.compressed.is_empty());
            assert!(!c.path.contains("424242424242") && !c.path.contains("345678901"), "{place}: {}", c.path);
        }
    }
}
