//! Trains the zstd dictionary audit payloads are compressed with (`auditlog/dict/<name>.zdict`,
//! see `src/dict.rs`) on Stripe-shaped records: exchanges of the operations payments services
//! call most, with the headers the official SDKs send and Stripe answers with, redacted exactly
//! as the audit log redacts them and serialised as the payload document.
//!
//! `cargo run --release -p keygate-auditlog --example train_zstd_dictionary -- auditlog/dict/stripe-v2.zdict`
//!
//! A shipped dictionary never changes (lake files name it by id): write a new file, add it to
//! `dict::KNOWN`, and make it `dict::current`. The records are generated, not real traffic; the
//! values (ids, amounts, times) are random, so the dictionary learns the shapes, not values.
#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, SystemTime};

use bytes::Bytes;
use keygate_auditlog::{Exchange, HttpMessage};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const SAMPLES: usize = 6000;
const DICT_BYTES: usize = 16 * 1024;

fn id(r: &mut StdRng, prefix: &str, n: usize) -> String {
    const ALNUM: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let tail: String = (0..n).map(|_| ALNUM[r.random_range(0..ALNUM.len())] as char).collect();
    format!("{prefix}_{tail}")
}

fn pick<'a>(r: &mut StdRng, from: &[&'a str]) -> &'a str {
    from[r.random_range(0..from.len())]
}

fn card(r: &mut StdRng) -> String {
    let brand = pick(r, &["visa", "mastercard", "amex", "discover"]);
    format!(
        r#"{{"brand":"{brand}","checks":{{"address_line1_check":null,"address_postal_code_check":"pass","cvc_check":"pass"}},"country":"US","display_brand":"{brand}","exp_month":{},"exp_year":{},"fingerprint":"{}","funding":"{}","generated_from":null,"last4":"{:04}","networks":{{"available":["{brand}"],"preferred":null}},"three_d_secure_usage":{{"supported":true}},"wallet":null}}"#,
        r.random_range(1..13),
        r.random_range(2026..2035),
        id(r, "fp", 16),
        pick(r, &["credit", "debit", "prepaid"]),
        r.random_range(0..10_000)
    )
}

fn payment_intent(r: &mut StdRng) -> String {
    let (pi, cus, amount) = (id(r, "pi", 24), id(r, "cus", 14), r.random_range(50..500_000));
    let status = pick(
        r,
        &["succeeded", "requires_payment_method", "requires_confirmation", "requires_action", "processing", "canceled"],
    );
    format!(
        r#"{{"id":"{pi}","object":"payment_intent","amount":{amount},"amount_capturable":0,"amount_details":{{"tip":{{}}}},"amount_received":{},"application":null,"application_fee_amount":null,"automatic_payment_methods":{{"allow_redirects":"never","enabled":true}},"canceled_at":null,"cancellation_reason":null,"capture_method":"automatic_async","client_secret":"{pi}_secret_{}","confirmation_method":"automatic","created":{},"currency":"{}","customer":"{cus}","description":"Order {}","last_payment_error":null,"latest_charge":"{}","livemode":false,"metadata":{{"order_id":"{}"}},"next_action":null,"on_behalf_of":null,"payment_method":"{}","payment_method_configuration_details":null,"payment_method_options":{{"card":{{"installments":null,"mandate_options":null,"network":null,"request_three_d_secure":"automatic"}}}},"payment_method_types":["card"],"processing":null,"receipt_email":null,"review":null,"setup_future_usage":null,"shipping":null,"source":null,"statement_descriptor":null,"statement_descriptor_suffix":null,"status":"{status}","transfer_data":null,"transfer_group":null}}"#,
        if status == "succeeded" { amount } else { 0 },
        id(r, "", 24).trim_start_matches('_'),
        r.random_range(1_700_000_000..1_800_000_000u64),
        pick(r, &["usd", "eur", "gbp", "cad", "jpy"]),
        r.random_range(1..10_000_000),
        id(r, "ch", 24),
        id(r, "ord", 10),
        id(r, "pm", 24)
    )
}

fn charge(r: &mut StdRng) -> String {
    let amount = r.random_range(50..500_000);
    format!(
        r#"{{"id":"{}","object":"charge","amount":{amount},"amount_captured":{amount},"amount_refunded":0,"application":null,"application_fee":null,"balance_transaction":"{}","billing_details":{{"address":{{"city":null,"country":null,"line1":null,"line2":null,"postal_code":"{:05}","state":null}},"email":null,"name":null,"phone":null}},"calculated_statement_descriptor":"KEYGATE","captured":true,"created":{},"currency":"usd","customer":"{}","description":null,"disputed":false,"failure_code":null,"failure_message":null,"fraud_details":{{}},"livemode":false,"metadata":{{}},"outcome":{{"network_status":"approved_by_network","reason":null,"risk_level":"normal","risk_score":{},"seller_message":"Payment complete.","type":"authorized"}},"paid":true,"payment_intent":"{}","payment_method":"{}","payment_method_details":{{"card":{},"type":"card"}},"receipt_email":null,"receipt_number":null,"receipt_url":"https://pay.stripe.com/receipts/payment/{}","refunded":false,"review":null,"shipping":null,"source_transfer":null,"statement_descriptor":null,"status":"succeeded","transfer_group":null}}"#,
        id(r, "ch", 24),
        id(r, "txn", 24),
        r.random_range(10_000..99_999),
        r.random_range(1_700_000_000..1_800_000_000u64),
        id(r, "cus", 14),
        r.random_range(0..100),
        id(r, "pi", 24),
        id(r, "pm", 24),
        card(r),
        id(r, "CAcaFwoV", 60)
    )
}

fn customer(r: &mut StdRng) -> String {
    format!(
        r#"{{"id":"{}","object":"customer","address":null,"balance":0,"created":{},"currency":null,"default_source":null,"delinquent":false,"description":null,"discount":null,"email":"buyer{}@example.com","invoice_prefix":"{}","invoice_settings":{{"custom_fields":null,"default_payment_method":null,"footer":null,"rendering_options":null}},"livemode":false,"metadata":{{"account_id":"{}"}},"name":"Customer {}","next_invoice_sequence":1,"phone":null,"preferred_locales":[],"shipping":null,"tax_exempt":"none","test_clock":null}}"#,
        id(r, "cus", 14),
        r.random_range(1_700_000_000..1_800_000_000u64),
        r.random_range(0..1_000_000),
        id(r, "", 8).trim_start_matches('_').to_uppercase(),
        r.random_range(0..1_000_000),
        r.random_range(0..1_000_000)
    )
}

fn refund(r: &mut StdRng) -> String {
    format!(
        r#"{{"id":"{}","object":"refund","amount":{},"balance_transaction":"{}","charge":"{}","created":{},"currency":"usd","destination_details":{{"card":{{"reference_status":"pending","reference_type":"acquirer_reference_number","type":"refund"}},"type":"card"}},"metadata":{{}},"payment_intent":"{}","reason":{},"receipt_number":null,"source_transfer_reversal":null,"status":"{}","transfer_reversal":null}}"#,
        id(r, "re", 24),
        r.random_range(50..50_000),
        id(r, "txn", 24),
        id(r, "ch", 24),
        r.random_range(1_700_000_000..1_800_000_000u64),
        id(r, "pi", 24),
        pick(r, &["null", "\"requested_by_customer\"", "\"duplicate\"", "\"fraudulent\""]),
        pick(r, &["succeeded", "pending"])
    )
}

fn payment_method(r: &mut StdRng) -> String {
    format!(
        r#"{{"id":"{}","object":"payment_method","allow_redisplay":"unspecified","billing_details":{{"address":{{"city":null,"country":null,"line1":null,"line2":null,"postal_code":null,"state":null}},"email":null,"name":null,"phone":null}},"card":{},"created":{},"customer":"{}","livemode":false,"metadata":{{}},"type":"card"}}"#,
        id(r, "pm", 24),
        card(r),
        r.random_range(1_700_000_000..1_800_000_000u64),
        id(r, "cus", 14)
    )
}

fn error(r: &mut StdRng) -> (u16, String) {
    let (status, kind, code, message, param) = match r.random_range(0..4) {
        0 => (402, "card_error", "card_declined", "Your card was declined.", ""),
        1 => (404, "invalid_request_error", "resource_missing", "No such customer: 'cus_0000000000'", "customer"),
        2 => (400, "invalid_request_error", "parameter_invalid_integer", "Invalid integer: abc", "amount"),
        _ => (
            400,
            "idempotency_error",
            "idempotency_key_in_use",
            "Keys for idempotent requests can only be used with the same parameters they were first used with.",
            "",
        ),
    };
    let body = format!(
        r#"{{"error":{{"code":"{code}","doc_url":"https://stripe.com/docs/error-codes/{}","message":"{message}","param":"{param}","request_log_url":"https://dashboard.stripe.com/test/logs/{}?t={}","type":"{kind}"}}}}"#,
        code.replace('_', "-"),
        id(r, "req", 14),
        r.random_range(1_700_000_000..1_800_000_000u64)
    );
    (status, body)
}

fn list(r: &mut StdRng, url: &str, item: fn(&mut StdRng) -> String) -> String {
    let items: Vec<String> = (0..r.random_range(0..4)).map(|_| item(r)).collect();
    format!(r#"{{"object":"list","data":[{}],"has_more":{},"url":"{url}"}}"#, items.join(","), r.random_bool(0.4))
}

/// One exchange: an operation, its form or query parameters, its response.
fn exchange(r: &mut StdRng) -> Exchange {
    let idem = uuid::Uuid::from_u128(r.random()).to_string();
    let (method, path, form, ok): (&str, String, String, String) = match r.random_range(0..10) {
        0..=2 => (
            "POST",
            "/v1/payment_intents".into(),
            format!(
                "amount={}&currency=usd&customer={}&payment_method={}&confirm=true&automatic_payment_methods[enabled]=true&automatic_payment_methods[allow_redirects]=never&description=Order+{}&metadata[order_id]={}",
                r.random_range(50..500_000),
                id(r, "cus", 14),
                id(r, "pm", 24),
                r.random_range(1..10_000_000),
                id(r, "ord", 10)
            ),
            payment_intent(r),
        ),
        3 => ("GET", format!("/v1/payment_intents/{}", id(r, "pi", 24)), String::new(), payment_intent(r)),
        4 => (
            "POST",
            "/v1/customers".into(),
            format!(
                "email=buyer{}%40example.com&name=Customer+{}&metadata[account_id]={}",
                r.random_range(0..1_000_000),
                r.random_range(0..1_000_000),
                r.random_range(0..1_000_000)
            ),
            customer(r),
        ),
        5 => ("GET", format!("/v1/customers/{}", id(r, "cus", 14)), String::new(), customer(r)),
        6 => (
            "POST",
            "/v1/refunds".into(),
            format!(
                "payment_intent={}&amount={}&reason=requested_by_customer",
                id(r, "pi", 24),
                r.random_range(50..50_000)
            ),
            refund(r),
        ),
        7 => (
            "GET",
            format!("/v1/charges?limit={}&customer={}", r.random_range(1..20), id(r, "cus", 14)),
            String::new(),
            list(r, "/v1/charges", charge),
        ),
        8 => (
            "POST",
            format!("/v1/payment_methods/{}/attach", id(r, "pm", 24)),
            format!("customer={}", id(r, "cus", 14)),
            payment_method(r),
        ),
        _ => (
            "GET",
            "/v1/payment_intents?limit=10".into(),
            String::new(),
            list(r, "/v1/payment_intents", payment_intent),
        ),
    };
    let (status, body) = if r.random_bool(0.08) { error(r) } else { (200, ok) };
    let request_id = id(r, "req", 14);
    let mut ex = Exchange::new(uuid::Uuid::from_u128(r.random()), method, &path);
    ex.completed_at = SystemTime::now() + Duration::from_millis(r.random_range(20..900));
    ex.status = status;
    let (lang, ua) = if r.random_bool(0.5) {
        ("python", format!("Stripe/v1 PythonBindings/{}.{}.0", r.random_range(10..13), r.random_range(0..9)))
    } else {
        ("node", format!("Stripe/v1 NodeBindings/{}.{}.0", r.random_range(16..19), r.random_range(0..9)))
    };
    let mut headers = vec![
        ("host".to_owned(), b"keygate.payments.svc:8080".to_vec()),
        ("authorization".to_owned(), format!("Bearer {}", id(r, "kg", 32)).into_bytes()),
        ("stripe-version".to_owned(), b"2025-07-30.basil".to_vec()),
        ("user-agent".to_owned(), ua.clone().into_bytes()),
        (
            "x-stripe-client-user-agent".to_owned(),
            format!(
                r#"{{"bindings_version":"{}","lang":"{lang}","publisher":"stripe","uname":"Linux 6.1.0 x86_64"}}"#,
                ua.rsplit('/').next().unwrap_or("")
            )
            .into_bytes(),
        ),
        ("accept".to_owned(), b"*/*".to_vec()),
        ("accept-encoding".to_owned(), b"gzip, deflate".to_vec()),
    ];
    if method == "POST" {
        headers.push(("content-type".to_owned(), b"application/x-www-form-urlencoded".to_vec()));
        headers.push(("content-length".to_owned(), form.len().to_string().into_bytes()));
        headers.push(("idempotency-key".to_owned(), idem.clone().into_bytes()));
    }
    ex.request = HttpMessage { start_line: format!("{method} {path} HTTP/1.1"), headers, body: Bytes::from(form) };
    let mut response_headers = vec![
        ("server".to_owned(), b"nginx".to_vec()),
        ("date".to_owned(), b"Tue, 01 Dec 2026 12:00:00 GMT".to_vec()),
        ("content-type".to_owned(), b"application/json".to_vec()),
        ("content-length".to_owned(), body.len().to_string().into_bytes()),
        ("access-control-allow-credentials".to_owned(), b"true".to_vec()),
        ("access-control-allow-methods".to_owned(), b"GET,HEAD,PUT,PATCH,POST,DELETE".to_vec()),
        ("access-control-allow-origin".to_owned(), b"*".to_vec()),
        ("access-control-expose-headers".to_owned(), b"Request-Id, Stripe-Manage-Version, Stripe-Should-Retry, X-Stripe-External-Auth-Required, X-Stripe-Privileged-Session-Required".to_vec()),
        ("access-control-max-age".to_owned(), b"300".to_vec()),
        ("cache-control".to_owned(), b"no-cache, no-store".to_vec()),
        ("request-id".to_owned(), request_id.into_bytes()),
        ("stripe-version".to_owned(), b"2025-07-30.basil".to_vec()),
        ("vary".to_owned(), b"Origin".to_vec()),
        ("strict-transport-security".to_owned(), b"max-age=63072000; includeSubDomains; preload".to_vec()),
    ];
    if method == "POST" {
        response_headers.push(("idempotency-key".to_owned(), idem.into_bytes()));
        response_headers.push(("original-request".to_owned(), id(r, "req", 14).into_bytes()));
    }
    let reason = if status == 200 { "OK" } else { "Error" };
    ex.response = Some(HttpMessage {
        start_line: format!("HTTP/1.1 {status} {reason}"),
        headers: response_headers,
        body: Bytes::from(body),
    });
    ex
}

fn main() {
    let out = std::env::args().nth(1).expect("usage: train_zstd_dictionary <out.zdict>");
    let mut r = StdRng::seed_from_u64(0x6b65_7967_6174_6531);
    let samples: Vec<Vec<u8>> = (0..SAMPLES)
        .map(|_| {
            let (_, doc) = keygate_auditlog::row::redact_exchange(&exchange(&mut r));
            serde_json::to_vec(&doc).expect("a payload document serialises")
        })
        .collect();
    let dict = zstd::dict::from_samples(&samples, DICT_BYTES).expect("training the dictionary");
    let raw: usize = samples.iter().map(Vec::len).sum();
    let plain: usize = samples.iter().map(|s| zstd::bulk::compress(s, 3).map(|c| c.len()).unwrap_or(0)).sum();
    let mut with = zstd::bulk::Compressor::with_dictionary(3, &dict).expect("a compressor with the dictionary");
    let dicted: usize = samples.iter().map(|s| with.compress(s).map(|c| c.len()).unwrap_or(0)).sum();
    std::fs::write(&out, &dict).expect("writing the dictionary");
    println!(
        "{out}: {} bytes, id {:?}; {SAMPLES} samples of {} bytes on average: zstd-3 {:.3} of raw, with the dictionary {:.3}",
        dict.len(),
        keygate_auditlog::dict::dict_id(&dict),
        raw / SAMPLES,
        plain as f64 / raw as f64,
        dicted as f64 / raw as f64
    );
}
