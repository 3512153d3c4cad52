//! Fuzz target for the redactor (issue 12): any bytes, used at once as a body (under every
//! content type), a header value, a path with its query string, a plaintext column and a
//! response, must produce a row without the panic fallback, and no recorded string may keep 12
//! consecutive ASCII digits (a card number would).
//!
//! Under `cargo test` the target first replays its seed corpus (the strings that made the
//! audit phase panic, and the attacker's probes of issue 12), then runs random inputs for a
//! bounded time ([`FUZZ_TIME`], or `KEYGATE_FUZZ_SECONDS`). With a nightly toolchain it runs
//! under libFuzzer: `cargo bolero test -p keygate-auditlog --test fuzz_redact redact_target`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::strings_of;

use std::time::Duration;

use bytes::Bytes;
use keygate_auditlog::row::redact_exchange_reporting;
use keygate_auditlog::{Exchange, HttpMessage};
use serde_json::Value;

/// How long the target runs random inputs under `cargo test`.
const FUZZ_TIME: Duration = Duration::from_secs(3);

fn fuzz_time() -> Duration {
    std::env::var("KEYGATE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).map_or(FUZZ_TIME, Duration::from_secs)
}

const SEEDS: &[&str] = &[
    "4242424242424242٤٤٤٤",
    "1234567890123٤٤٤٤",
    "٤٤٤٤1234567890123",
    "email=4242424242424242%D9%A4%D9%A4&card[number]=1234567890123%D9%A4",
    "card[cvc]=123&amount=100",
    "a=1;card[cvc]=123",
    "card[cvc][]=123&card[cvc][0]=456",
    "4242.4242.4242.4242 4242/4242/4242/4242 4242  4242  4242  4242",
    "abc4242424242424242xyz",
    "123456789012",
    "{\"n\":123456789012}",
    "{\"card\":{\"number\":4242424242424242,\"cvc\":\"123\"},\"dob\":{\"year\":1990}}",
    "{\"a\":[[[[[[[[[[[[[[[[[[[[\"4242424242424242\"]]]]]]]]]]]]]]]]]]]}",
    "{\"n\":1e400,\"m\":-4242424242424242,\"f\":4242424242424242.5}",
    "sk_kg_Ab-_cDeFgHiJkLmNoPqRsTuVwXyZ0123456789-_Q xsk_live_51Habcdefghij",
    "cs_test_a1B2_secret_X9y8 cuss_secret_abc pi_1_secret_2",
    "%34%32%34%32%34%32%34%32%34%32%34%32%34%32%34%32",
    "%2534%2532%2534%2532%2534%2532%2534%2532%2534%2532%2534%2532",
    "%",
    "%%%%4",
    "\u{a0}4\u{200b}2\u{2212}4",
    "",
];

const CONTENT_TYPES: &[&str] =
    &["", "application/x-www-form-urlencoded", "application/json", "text/plain", "multipart/form-data; boundary=b"];

fn has_12_consecutive_digits(s: &str) -> bool {
    let mut run = 0;
    for b in s.bytes() {
        run = if b.is_ascii_digit() { run + 1 } else { 0 };
        if run >= 12 {
            return true;
        }
    }
    false
}

fn check(input: &[u8]) {
    let text = String::from_utf8_lossy(input);
    let response_body = if serde_json::from_slice::<Value>(input).is_ok() {
        input.to_vec()
    } else {
        serde_json::json!({ "description": text, text.to_string(): [text] }).to_string().into_bytes()
    };
    for ct in CONTENT_TYPES {
        let path = format!("/v1/customers/{text}?q={text}");
        let mut ex = Exchange::new(uuid::Uuid::now_v7(), "POST", &path);
        let mut headers = vec![("User-Agent".to_owned(), input.to_vec()), ("X-Other".to_owned(), input.to_vec())];
        if !ct.is_empty() {
            headers.push(("Content-Type".to_owned(), ct.as_bytes().to_vec()));
        }
        ex.request =
            HttpMessage { start_line: format!("POST {path} HTTP/1.1"), headers, body: Bytes::from(input.to_vec()) };
        ex.reason = Some(text.to_string());
        ex.idempotency_key = Some(text.to_string());
        ex.response = Some(HttpMessage {
            start_line: "HTTP/1.1 200 OK".into(),
            headers: vec![("Content-Type".into(), b"application/json".to_vec())],
            body: Bytes::from(response_body.clone()),
        });
        let (columns, doc, failed) = redact_exchange_reporting(&ex);
        assert!(!failed, "redaction panicked on {input:?} ({ct})");
        let mut strings = Vec::new();
        strings_of(&serde_json::to_value(&doc).unwrap(), &mut strings);
        // Plaintext string columns (not the event id, a UUID, nor the numeric columns).
        let mut cols = serde_json::to_value(&columns).unwrap();
        cols.as_object_mut().unwrap().retain(|k, v| k != "event_id" && (v.is_string() || v.is_null()));
        strings_of(&cols, &mut strings);
        for s in &strings {
            assert!(!has_12_consecutive_digits(s), "12 digits survived in {s:?} from {input:?} ({ct})");
        }
    }
}

#[test]
fn redact_target() {
    SEEDS.iter().for_each(|s| check(s.as_bytes()));
    bolero::check!().with_test_time(fuzz_time()).for_each(|input: &[u8]| check(input));
}
